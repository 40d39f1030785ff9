"""fastpeft.prefix_attention against explicit concatenation in float64, with gradients, custom-op checks, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastpeft
from helpers import assert_error_bounded, randn


def concat_attention64(q, k, v, prefix_k, prefix_v, attn_mask=None, causal=False, scale=None, return_lse=False):
    """Attention over the explicit concatenation [prefix; k], written out in float64 (the independent truth)."""
    q, k, v, prefix_k, prefix_v = (t.double() for t in (q, k, v, prefix_k, prefix_v))
    batch, hq, t, dim = q.shape
    hkv, s, length = k.shape[1], k.shape[2], prefix_k.shape[1]
    group = hq // hkv
    keys = torch.cat([prefix_k.unsqueeze(0).expand(batch, -1, -1, -1), k], dim=2).repeat_interleave(group, dim=1)
    values = torch.cat([prefix_v.unsqueeze(0).expand(batch, -1, -1, -1), v], dim=2).repeat_interleave(group, dim=1)
    scores = q @ keys.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(dim))
    main_bias = torch.zeros(batch, hq, t, s, dtype=torch.float64)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            main_bias = main_bias.masked_fill(~attn_mask, float("-inf"))
        else:
            main_bias = main_bias + attn_mask.double()
    if causal:
        i = torch.arange(t).unsqueeze(1)
        j = torch.arange(s).unsqueeze(0)
        main_bias = main_bias.masked_fill(j > i + (s - t), float("-inf"))
    scores = scores + torch.cat([torch.zeros(batch, hq, t, length, dtype=torch.float64), main_bias], dim=-1)
    out = torch.softmax(scores, dim=-1) @ values
    return (out, torch.logsumexp(scores, dim=-1)) if return_lse else out


def make_inputs(batch=2, hq=4, hkv=2, t=5, s=7, length=3, dim=8, dtype=torch.float64, grad=False):
    return dict(
        q=randn(batch, hq, t, dim, dtype=dtype, requires_grad=grad),
        k=randn(batch, hkv, s, dim, dtype=dtype, requires_grad=grad),
        v=randn(batch, hkv, s, dim, dtype=dtype, requires_grad=grad),
        prefix_k=randn(hkv, length, dim, dtype=dtype, requires_grad=grad),
        prefix_v=randn(hkv, length, dim, dtype=dtype, requires_grad=grad),
    )


def padding_mask(batch, s, lengths):
    """[B, 1, 1, S] boolean key-padding mask: the first lengths[b] keys of sequence b take part."""
    return (torch.arange(s).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).view(batch, 1, 1, s)


MASK_CASES = {
    "none": lambda b, hq, t, s: None,
    "padding-bool": lambda b, hq, t, s: padding_mask(b, s, [s, 3][:b]),
    "full-bool": lambda b, hq, t, s: torch.rand(b, hq, t, s) > 0.4,
    "float-additive": lambda b, hq, t, s: torch.where(torch.rand(b, 1, t, s) > 0.3, 0.0, -1e9).double(),
    "float-with-inf": lambda b, hq, t, s: torch.where(torch.rand(1, hq, t, s) > 0.3, 0.5, float("-inf")).double(),
    "2d": lambda b, hq, t, s: torch.rand(t, s) > 0.5,
}


# ------------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("mask", list(MASK_CASES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_matches_concatenation(mask, causal, heads):
    hq, hkv = heads
    args = make_inputs(hq=hq, hkv=hkv)
    attn_mask = MASK_CASES[mask](2, hq, 5, 7)
    out = fastpeft.prefix_attention(**args, causal=causal, attn_mask=attn_mask)
    expected = concat_attention64(**args, attn_mask=attn_mask, causal=causal)
    assert out.shape == args["q"].shape and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t, s", [(1, 9), (3, 9), (6, 4)], ids=["decode", "chunk", "more-queries-than-keys"])
def test_causal_is_bottom_right_aligned(t, s):
    args = make_inputs(t=t, s=s)
    out = fastpeft.prefix_attention(**args, causal=True)
    torch.testing.assert_close(out, concat_attention64(**args, causal=True), rtol=1e-10, atol=1e-10)


def test_merged_lse_and_rows_without_main_keys():
    """Rows whose main keys are all hidden take the prefix alone, and their merged lse is the prefix's."""
    args = make_inputs(batch=2, t=4, s=6)
    mask = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    mask[1, :, 2] = False  # batch 1, query row 2 sees no main key
    out, lse = torch.ops.fastpeft.prefix_attention_fwd(*args.values(), mask, False, 0.3)
    expected, expected_lse = concat_attention64(**args, attn_mask=mask, scale=0.3, return_lse=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-10, atol=1e-10)
    assert lse.dtype == torch.float64 and lse.shape == (2, 4, 4)
    # Batch 1, row 2 by hand: softmax over the prefix keys of each query head's key/value head (2 query heads each).
    pk, pv = args["prefix_k"].repeat_interleave(2, 0), args["prefix_v"].repeat_interleave(2, 0)
    prefix_scores = torch.einsum("hd,hld->hl", args["q"][1, :, 2], pk) * 0.3
    torch.testing.assert_close(out[1, :, 2], torch.einsum("hl,hld->hd", prefix_scores.softmax(-1), pv))
    torch.testing.assert_close(lse[1, :, 2], prefix_scores.logsumexp(-1))


def test_no_main_keys_at_all():
    args = make_inputs(s=0)
    out = fastpeft.prefix_attention(**args)
    torch.testing.assert_close(out, concat_attention64(**args), rtol=1e-10, atol=1e-10)


def test_custom_scale_and_non_contiguous_inputs():
    args = make_inputs()
    q = randn(2, 5, 4, 8).transpose(1, 2)  # [B, Hq, T, D] view of a [B, T, Hq, D] tensor, as transformers has it
    args["q"] = q
    out = fastpeft.prefix_attention(**args, scale=0.2)
    torch.testing.assert_close(out, concat_attention64(**args, scale=0.2), rtol=1e-10, atol=1e-10)


def test_dropout_is_unbiased_and_differentiable():
    args = make_inputs(batch=1, hq=2, hkv=1, t=2, s=3, length=2, dim=4, grad=True)
    clean = concat_attention64(**args)
    draws = torch.stack([fastpeft.prefix_attention(**args, dropout_p=0.3) for _ in range(4000)])
    assert not torch.allclose(draws[0], clean)  # dropout changes a single draw
    # The mean of dropped-out attention is the clean attention (probabilities are rescaled by 1 / (1 - p)).
    torch.testing.assert_close(draws.mean(0), clean, rtol=0, atol=0.08)
    draws[0].sum().backward()
    assert args["prefix_k"].grad is not None and args["prefix_v"].grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("mask", ["none", "padding-bool", "float-with-inf"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_all_inputs(mask, causal):
    args = make_inputs(batch=2, hq=4, hkv=2, t=3, s=4, length=2, dim=4, grad=True)
    attn_mask = MASK_CASES[mask](2, 4, 3, 4)
    assert torch.autograd.gradcheck(
        lambda *t: fastpeft.prefix_attention(*t, causal=causal, attn_mask=attn_mask), tuple(args.values())
    )


def test_gradients_match_concatenation_with_masked_rows():
    args = make_inputs(grad=True)
    mask = padding_mask(2, 7, [7, 2])
    mask = mask.expand(2, 1, 5, 7).clone()
    mask[0, :, 1] = False
    dout = randn(2, 4, 5, 8)
    out = fastpeft.prefix_attention(**args, attn_mask=mask, causal=True)
    grads = torch.autograd.grad(out, list(args.values()), dout)
    ref_args = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}
    expected_out = concat_attention64(**ref_args, attn_mask=mask, causal=True)
    expected = torch.autograd.grad(expected_out, list(ref_args.values()), dout)
    for name, g, e in zip(args, grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_only_prefix_gradients():
    args = make_inputs()
    args["prefix_k"].requires_grad_(True)
    args["prefix_v"].requires_grad_(True)
    fastpeft.prefix_attention(**args).sum().backward()
    assert args["prefix_k"].grad is not None and args["prefix_v"].grad is not None
    assert args["q"].grad is None and args["k"].grad is None


# ------------------------------------------------------------------------------------------------ custom op


@pytest.mark.parametrize("mask", ["none", "padding-bool", "float-additive"])
def test_opcheck(mask):
    args = make_inputs(grad=True)
    attn_mask = MASK_CASES[mask](2, 4, 5, 7)
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_fwd.default, (*args.values(), attn_mask, True, 0.35))
    out, lse = torch.ops.fastpeft.prefix_attention_fwd(*[t.detach() for t in args.values()], attn_mask, True, 0.35)
    bwd_args = (randn(*out.shape), *[t.detach() for t in args.values()], attn_mask, out, lse, True, 0.35)
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_bwd.default, (*bwd_args, [True] * 5))
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_bwd.default, (*bwd_args, [False, False, False, True, True]))


def test_torch_compile_fullgraph():
    args = make_inputs(dtype=torch.float32, grad=True)
    mask = padding_mask(2, 7, [7, 4])

    def fn(q, k, v, prefix_k, prefix_v):
        return fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, attn_mask=mask).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(*args.values())
    grads = torch.autograd.grad(loss, list(args.values()))
    expected = torch.autograd.grad(fn(*args.values()), list(args.values()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


# ------------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_bounded_by_eager(dtype):
    args64 = make_inputs(batch=2, hq=4, hkv=2, t=16, s=16, length=5, dim=32)
    args = {k: v.to(dtype) for k, v in args64.items()}
    mask = padding_mask(2, 16, [16, 9])
    truth = concat_attention64(**args, attn_mask=mask, causal=True)
    # Eager at the same precision: concatenation then scaled_dot_product_attention, as peft and adapters do it.
    keys = torch.cat([args["prefix_k"].unsqueeze(0).expand(2, -1, -1, -1), args["k"]], 2).repeat_interleave(2, 1)
    values = torch.cat([args["prefix_v"].unsqueeze(0).expand(2, -1, -1, -1), args["v"]], 2).repeat_interleave(2, 1)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    full_mask = torch.cat([torch.ones(2, 1, 16, 5, dtype=torch.bool), mask & causal], -1)
    eager = F.scaled_dot_product_attention(args["q"], keys, values, attn_mask=full_mask)
    out = fastpeft.prefix_attention(**args, attn_mask=mask, causal=True)
    assert out.dtype == dtype
    assert_error_bounded(out, eager, truth, factor=2.0)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        ({"q": randn(2, 4, 5)}, ValueError, ["'q'", "4-D"]),
        ({"k": randn(2, 2, 7, 8, dtype=torch.float32)}, TypeError, ["'k'", "torch.float32"]),
        ({"v": randn(2, 2, 7, 8, device="meta")}, ValueError, ["'v'", "device"]),
        ({"k": randn(2, 3, 7, 8), "v": randn(2, 3, 7, 8)}, ValueError, ["multiple", "(4)", "(3)"]),
        ({"k": randn(3, 2, 7, 8)}, ValueError, ["'k'", "B=2"]),
        ({"v": randn(2, 2, 6, 8)}, ValueError, ["'v'", "shape of 'k'"]),
        ({"prefix_k": randn(2, 0, 8), "prefix_v": randn(2, 0, 8)}, ValueError, ["'prefix_k'", "L >= 1"]),
        ({"prefix_k": randn(4, 3, 8)}, ValueError, ["'prefix_k'", "Hkv=2"]),
        ({"prefix_v": randn(2, 4, 8)}, ValueError, ["'prefix_v'", "shape of 'prefix_k'"]),
        ({"attn_mask": torch.ones(2, 1, 5, 6, dtype=torch.bool)}, ValueError, ["'attn_mask'", "broadcastable", "(2, 4, 5, 7)"]),
        ({"attn_mask": torch.ones(2, 1, 5, 7, dtype=torch.int64)}, TypeError, ["'attn_mask'", "torch.int64"]),
        ({"causal": 1}, TypeError, ["'causal'", "bool"]),
        ({"dropout_p": 1.0}, ValueError, ["'dropout_p'"]),
    ],
)
def test_bad_arguments_give_clear_errors(overrides, error, words):
    args = make_inputs() | overrides
    with pytest.raises(error) as info:
        fastpeft.prefix_attention(**args)
    message = str(info.value)
    assert message.startswith("fastpeft.prefix_attention:"), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
