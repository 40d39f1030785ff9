"""The fused prefix kernels and the CUDA path of fastpeft.prefix_attention on a GPU. Skips without one.

Truth: explicit concatenation [prefix; keys] in float64. Error bound: at most twice the error of eager PyTorch at the
same precision (concatenate the expanded prefix onto K and V, then scaled_dot_product_attention with the extended
mask: what `adapters` and `peft` do), plus a small absolute slack.

A small subset for compute-sanitizer (names contain "small"):
    compute-sanitizer --tool memcheck .venv/bin/python -m pytest -q tests/cuda/test_prefix_kernels_cuda.py -k small
    compute-sanitizer --tool racecheck .venv/bin/python -m pytest -q tests/cuda/test_prefix_kernels_cuda.py -k small
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastpeft
from fastpeft.ops import _prefix_cuda
from fastpeft.ops._prefix_torch import TorchPrefixKernels
from helpers import assert_error_bounded, requires_kernels
from test_prefix_attention_op import concat_attention64

pytestmark = requires_kernels

HALF = [torch.bfloat16, torch.float16]


def poison_allocator():
    """Fill and free a large block so that fresh allocations start as NaN: catches unwritten output elements."""
    block = torch.full((256 * 1024 * 1024,), float("nan"), dtype=torch.float32, device="cuda")
    del block


def inputs(b, hq, hkv, t, s, length, d, dtype, grad=False, scale=1.0):
    def r(*shape):
        return (torch.randn(*shape, device="cuda", dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)

    return dict(q=r(b, hq, t, d), k=r(b, hkv, s, d), v=r(b, hkv, s, d), prefix_k=r(hkv, length, d),
                prefix_v=r(hkv, length, d))


def main_mask(kind, b, hq, t, s):
    if kind is None:
        return None
    if kind == "padding":  # [B, 1, 1, S]: sequence i keeps its first lengths[i] keys
        lengths = torch.tensor([s, max(1, s // 3)] * b, device="cuda")[:b]
        return (torch.arange(s, device="cuda") < lengths.unsqueeze(1)).view(b, 1, 1, s)
    if kind == "full-bool":
        return torch.rand(b, hq, t, s, device="cuda") > 0.3
    if kind == "additive":
        return torch.where(torch.rand(b, 1, t, s, device="cuda") > 0.3, 0.0, -1e4)
    raise ValueError(kind)


def eager_concat(args, attn_mask, causal, scale):
    """Eager PyTorch at the inputs' precision: expanded prefix concatenated onto K, V; SDPA with the extended mask."""
    q, k, v, pk, pv = (args[n] for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    b, hq, t, _ = q.shape
    hkv, s, length = k.shape[1], k.shape[2], pk.shape[1]
    keys = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), k], 2).repeat_interleave(hq // hkv, 1)
    values = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), v], 2).repeat_interleave(hq // hkv, 1)
    visible = torch.ones(b, hq, t, s, dtype=torch.bool, device="cuda")
    bias = torch.zeros(b, hq, t, s, dtype=q.dtype, device="cuda")
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            bias = bias + attn_mask.to(q.dtype)
    if causal:
        i = torch.arange(t, device="cuda").unsqueeze(1)
        j = torch.arange(s, device="cuda").unsqueeze(0)
        visible = visible & ~(j > i + (s - t))
    main_bias = bias.masked_fill(~visible, float("-inf"))
    full = torch.cat([torch.zeros(b, hq, t, length, dtype=q.dtype, device="cuda"), main_bias], -1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=full, scale=scale)


def truth64(args, attn_mask, causal, scale, dout=None):
    leaves = {n: a.detach().double().requires_grad_(dout is not None) for n, a in args.items()}
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double()
    out, lse = concat_attention64(**leaves, attn_mask=mask, causal=causal, scale=scale, return_lse=True)
    grads = torch.autograd.grad(out, list(leaves.values()), dout.double()) if dout is not None else None
    return out.detach(), lse.detach(), grads


CASES = {
    # name: (B, Hq, Hkv, T, S, L, D, causal, mask)
    "small-mha": (2, 2, 2, 33, 33, 10, 64, False, None),
    "small-gqa-causal": (2, 4, 2, 40, 40, 30, 64, True, None),
    "small-multichunk": (1, 2, 1, 17, 20, 200, 128, True, None),
    "mqa-padding": (2, 8, 1, 64, 64, 30, 128, False, "padding"),
    "gqa-causal-padding": (2, 8, 2, 96, 96, 30, 128, True, "padding"),
    "decode-long-s": (3, 8, 2, 1, 4096, 30, 128, True, None),
    "chunk-prefill": (2, 4, 4, 16, 300, 10, 64, True, None),
    "more-queries-than-keys": (2, 4, 2, 48, 20, 12, 64, True, None),  # rows without a main key (flash: +inf)
    "full-bool-mask": (2, 4, 2, 40, 50, 64, 96, False, "full-bool"),
    "additive-mask": (2, 4, 4, 40, 50, 65, 72, True, "additive"),
    "head-dim-32": (2, 4, 2, 70, 70, 30, 32, True, None),
    "head-dim-160": (2, 4, 2, 50, 50, 30, 160, False, None),
    "head-dim-256": (2, 2, 1, 65, 65, 40, 256, True, "padding"),
    "prefix-200": (2, 4, 4, 128, 128, 200, 64, True, None),
    "one-prefix-key": (2, 4, 2, 30, 30, 1, 64, False, None),
}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_error_bounded_by_eager(case, dtype):
    b, hq, hkv, t, s, length, d, causal, mask_kind = CASES[case]
    torch.manual_seed(0)
    args = inputs(b, hq, hkv, t, s, length, d, dtype, grad=True)
    attn_mask = main_mask(mask_kind, b, hq, t, s)
    scale = 1 / math.sqrt(d)
    dout = torch.randn(b, hq, t, d, device="cuda").to(dtype)
    poison_allocator()
    out = fastpeft.prefix_attention(**args, causal=causal, attn_mask=attn_mask)
    grads = torch.autograd.grad(out, list(args.values()), dout)
    eager_args = {n: a.detach().clone().requires_grad_(True) for n, a in args.items()}
    eager = eager_concat(eager_args, attn_mask, causal, scale)
    eager_grads = torch.autograd.grad(eager, list(eager_args.values()), dout)
    truth, _, truth_grads = truth64(args, attn_mask, causal, scale, dout)

    assert out.dtype == dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    assert_error_bounded(out, eager, truth, factor=2.0, atol=1e-5, name=f"{case} out")
    for name, g, e, tg in zip(args, grads, eager_grads, truth_grads):
        assert torch.isfinite(g).all(), name
        assert_error_bounded(g, e, tg, factor=2.0, atol=1e-5, name=f"{case} d{name}")


@pytest.mark.parametrize("dtype", HALF)
def test_small_merged_lse_and_rows_without_main_keys(dtype):
    """Rows that see no main key take the prefix alone, through both backends (flash: causal T > S; efficient: a
    sequence with every key masked)."""
    torch.manual_seed(1)
    for causal, t, s, lengths in ((True, 40, 16, None), (False, 24, 24, [24, 0])):
        args = inputs(2, 4, 2, t, s, 30, 64, dtype)
        mask = None
        if lengths is not None:
            mask = (torch.arange(s, device="cuda") < torch.tensor(lengths, device="cuda").unsqueeze(1)).view(2, 1, 1, s)
        scale = 0.125
        out, lse = torch.ops.fastpeft.prefix_attention_fwd(*args.values(), mask, causal, scale)
        truth, truth_lse, _ = truth64(args, mask, causal, scale)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        assert lse.dtype == torch.float32 and lse.shape == (2, 4, t) and lse.is_contiguous()
        torch.testing.assert_close(lse.double(), truth_lse, rtol=1e-4, atol=1e-4)
        eager = eager_concat(args, mask, causal, scale)
        assert_error_bounded(out, eager, truth, factor=2.0, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("length", [30, 200], ids=["fused", "dq-and-dP-kernels"])
def test_small_prefix_gradients_are_deterministic(dtype, length):
    torch.manual_seed(2)
    args = inputs(4, 8, 2, 200, 200, length, 128, dtype, grad=True)
    dout = torch.randn(4, 8, 200, 128, device="cuda").to(dtype)
    runs = []
    for _ in range(2):
        out = fastpeft.prefix_attention(**args, causal=True)
        runs.append(torch.autograd.grad(out, [args["prefix_k"], args["prefix_v"]], dout))
    # (dq is not compared: FA2's own backward may accumulate dq with atomics.)
    for first, second, name in zip(*runs, ("dprefix_k", "dprefix_v")):
        assert torch.equal(first, second), f"{name} differs between two identical runs"
    # The prefix kernel alone, on fixed inputs: dq too.
    q, pk, pv = (args[n].detach() for n in ("q", "prefix_k", "prefix_v"))
    out, lse = torch.ops.fastpeft_cuda.prefix_forward(q, pk, pv, None, None, 0.1)
    dq_main = torch.randn_like(q)
    first = torch.ops.fastpeft_cuda.prefix_backward(dout, q, pk, pv, out, lse, dq_main, 0.1, True, True)
    second = torch.ops.fastpeft_cuda.prefix_backward(dout, q, pk, pv, out, lse, dq_main, 0.1, True, True)
    for a, b, name in zip(first, second, ("dq", "dprefix_k", "dprefix_v")):
        assert torch.equal(a, b), f"{name} of the prefix kernel differs between two identical runs"


@pytest.mark.parametrize("length", [30, 200])
def test_small_kernels_follow_the_torch_semantics(length):
    """The fused kernels against `TorchPrefixKernels` (the same math with cuBLAS in float32) on the same half inputs,
    with main states holding every LSE convention: finite, +inf (flash, no key), -inf (efficient), NaN out_main."""
    torch.manual_seed(3)
    b, hq, hkv, t, d = 2, 4, 2, 70, 64
    args = inputs(b, hq, hkv, t, 1, length, d, torch.bfloat16)
    q, pk, pv = args["q"], args["prefix_k"], args["prefix_v"]
    # out_main as a [B, H, T, D] view of [B, T, H, D] memory; lse_main as a slice of a padded buffer.
    o_main = torch.randn(b, t, hq, d, device="cuda").to(torch.bfloat16).transpose(1, 2)
    lse_main = torch.randn(b, hq, 96, device="cuda")[..., :t]
    lse_main[0, 1, 3] = float("inf")
    lse_main[1, 2, 5] = float("-inf")
    o_main[0, 1, 3] = float("nan")  # not read: its row has no main key
    o_main[1, 2, 5] = float("nan")
    out, lse = torch.ops.fastpeft_cuda.prefix_forward(q, pk, pv, o_main, lse_main, 0.2)
    ref_out, ref_lse = TorchPrefixKernels().forward(q.float(), pk.float(), pv.float(), o_main.float(), lse_main, 0.2)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)

    dout = torch.randn_like(out)
    # dq_main in [B, T, H, D] memory (as flash returns it for such a q): read with its strides.
    dq_main = torch.randn(b, t, hq, d, device="cuda").to(torch.bfloat16).transpose(1, 2)
    dq, dpk, dpv = torch.ops.fastpeft_cuda.prefix_backward(dout, q, pk, pv, out, lse, dq_main, 0.2, True, True)
    ref = TorchPrefixKernels().backward(dout.float(), q.float(), pk.float(), pv.float(), out.float(), lse,
                                        dq_main.float(), 0.2, True, True)
    assert dq.is_contiguous() and dq.dtype == torch.bfloat16
    for name, got, want in zip(("dq", "dprefix_k", "dprefix_v"), (dq, dpk, dpv), ref):
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2, msg=lambda m: f"{name}: {m}")
    # No main part: dq is the prefix part alone; nothing asked: empty results.
    dq0, _, _ = torch.ops.fastpeft_cuda.prefix_backward(dout, q, pk, pv, out, lse, None, 0.2, True, False)
    ref0 = TorchPrefixKernels().backward(dout.float(), q.float(), pk.float(), pv.float(), out.float(), lse, None,
                                         0.2, True, False)
    torch.testing.assert_close(dq0.float(), ref0[0], rtol=2e-2, atol=5e-2)
    empty = torch.ops.fastpeft_cuda.prefix_backward(dout, q, pk, pv, out, lse, None, 0.2, False, False)
    assert all(e.numel() == 0 for e in empty)


def test_small_no_main_keys_and_float32():
    torch.manual_seed(4)
    for dtype, s in ((torch.bfloat16, 0), (torch.float32, 40), (torch.float32, 0)):
        args = inputs(2, 4, 2, 20, s, 30, 64, dtype, grad=True)
        out = fastpeft.prefix_attention(**args, causal=s > 0)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, list(args.values()), dout)
        truth, _, truth_grads = truth64(args, None, s > 0, 1 / 8, dout)
        eager_args = {n: a.detach().clone().requires_grad_(True) for n, a in args.items()}
        eager = eager_concat(eager_args, None, s > 0, 1 / 8)
        eager_grads = torch.autograd.grad(eager, list(eager_args.values()), dout)
        assert_error_bounded(out, eager, truth, factor=2.0, atol=1e-5, name=f"{dtype} S={s} out")
        for name, g, e, tg in zip(args, grads, eager_grads, truth_grads):
            assert_error_bounded(g, e, tg, factor=2.0, atol=1e-5, name=f"{dtype} S={s} d{name}")


def test_float64_and_odd_head_dims_fall_back_with_a_notice():
    args = inputs(1, 2, 1, 5, 5, 3, 20, torch.bfloat16)  # head dim 20: not a multiple of 8
    with pytest.warns(fastpeft.FastPeftFallbackWarning, match="head dim 20"):
        fastpeft.prefix_attention(**args)
    args = inputs(1, 2, 1, 5, 5, 3, 64, torch.float64)
    with pytest.warns(fastpeft.FastPeftFallbackWarning, match="float64"):
        out = fastpeft.prefix_attention(**args)
    torch.testing.assert_close(out, truth64(args, None, False, 1 / 8)[0], rtol=1e-10, atol=1e-10)


def test_opcheck_and_compile_on_cuda():
    torch.manual_seed(5)
    args = inputs(2, 4, 2, 24, 24, 10, 64, torch.bfloat16, grad=True)
    mask = main_mask("padding", 2, 4, 24, 24)
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_fwd.default, (*args.values(), mask, True, 0.125))

    def fn(q, k, v, prefix_k, prefix_v):
        out = fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, attn_mask=mask)
        return out.float().square().sum()

    compiled = torch.compile(fn, fullgraph=True)
    grads = torch.autograd.grad(compiled(*args.values()), list(args.values()))
    expected = torch.autograd.grad(fn(*args.values()), list(args.values()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def peak_extra_bytes(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("length, d", [(30, 64), (200, 64), (200, 128)])
def test_peak_memory_not_above_concatenation(length, d):
    """Forward + backward at a benchmark shape (B = 8, H = 16, T = S = 512): no [B, H, L, D] expanded copy of the
    prefix, and a peak no higher than concatenation's (the prefix backward's float32 partial sums included)."""
    torch.manual_seed(6)
    b, h, t = 8, 16, 512
    args = inputs(b, h, h, t, t, length, d, torch.bfloat16, grad=True)
    dout = torch.randn(b, h, t, d, device="cuda").to(torch.bfloat16)

    def ours():
        out = fastpeft.prefix_attention(**args, causal=True)
        torch.autograd.grad(out, list(args.values()), dout)

    def concat():
        out = eager_concat(args, None, True, 1 / math.sqrt(d))
        torch.autograd.grad(out, list(args.values()), dout)

    ours()  # warm-up
    concat()
    assert peak_extra_bytes(ours) <= peak_extra_bytes(concat)


def test_small_misaligned_and_strided_inputs():
    """Contiguous views at an odd storage offset (not 16-byte aligned) and [B, T, H, D] layouts are copied or read
    with their strides as the kernels need; the result does not depend on the layout."""
    torch.manual_seed(7)
    b, hq, hkv, t, length, d = 2, 4, 2, 33, 30, 64

    def odd_offset(*shape):
        flat = torch.randn(1 + math.prod(shape), device="cuda").to(torch.bfloat16)
        return flat[1:].view(*shape)

    args = dict(q=odd_offset(b, hq, t, d), k=odd_offset(b, hkv, t, d), v=odd_offset(b, hkv, t, d),
                prefix_k=odd_offset(hkv, length, d), prefix_v=odd_offset(hkv, length, d))
    args = {n: a.requires_grad_(True) for n, a in args.items()}
    out = fastpeft.prefix_attention(**args, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(args.values()), dout)
    plain = {n: a.detach().clone().requires_grad_(True) for n, a in args.items()}
    plain["q"] = plain["q"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    out2 = fastpeft.prefix_attention(**plain, causal=True)
    grads2 = torch.autograd.grad(out2, list(plain.values()), dout)
    # Same math on the same values; only PyTorch's main kernels may order their sums differently per layout.
    torch.testing.assert_close(out, out2)
    for g, g2 in zip(grads, grads2):
        assert g.is_contiguous()
        torch.testing.assert_close(g, g2)


def test_dropout_falls_back_with_a_notice():
    args = inputs(1, 2, 1, 8, 8, 3, 64, torch.bfloat16)
    with pytest.warns(fastpeft.FastPeftFallbackWarning, match="dropout"):
        out = fastpeft.prefix_attention(**args, dropout_p=0.1)
    assert out.shape == args["q"].shape and torch.isfinite(out).all()


@pytest.mark.parametrize("mask_kind", [None, "padding"], ids=["flash", "efficient"])
def test_cuda_graph_replay_reads_new_inputs(mask_kind):
    """Forward and backward ops captured in a CUDA graph (no host synchronisation anywhere on the path): each replay
    computes what an eager call on the new inputs computes."""
    dtype, b, hq, hkv, t, s, length, d = torch.bfloat16, 2, 4, 2, 128, 128, 30, 64
    args = inputs(b, hq, hkv, t, s, length, d, dtype)
    mask = main_mask(mask_kind, b, hq, t, s)
    dout = torch.randn(b, hq, t, d, device="cuda").to(dtype)
    scale, needs = 1 / math.sqrt(d), [True] * 5

    def step():
        out, lse = torch.ops.fastpeft.prefix_attention_fwd(*args.values(), mask, True, scale)
        grads = torch.ops.fastpeft.prefix_attention_bwd(dout, *args.values(), mask, out, lse, True, scale, needs)
        return (out, lse, *grads)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture (lazy initialisation, workspaces)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    for _ in range(2):
        for value in (*args.values(), dout):
            value.copy_(torch.randn_like(value, dtype=torch.float32).to(dtype))
        graph.replay()
        expected = step()
        # Forward is deterministic; the main attention's backward may accumulate dq in a run-dependent order.
        assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])
        for got, want in zip(captured[2:], expected[2:]):
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
