"""The host side of the prefix kernels, on the CPU: the guards on PyTorch's private attention ops, backend choice,
mask-to-bias conversion, LSE conventions, and the forward/backward composition run against emulated kernels."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastpeft
from fastpeft import FastPeftFallbackWarning, reference
from fastpeft.ops import _prefix_cuda, _sdpa_lse
from fastpeft.ops._prefix_cuda import Plan, compose_backward, compose_forward, efficient_bias, plan
from fastpeft.ops._prefix_torch import TorchPrefixKernels, fold_rows, unfold_rows
from helpers import randn
from prefix_emulation import EmulatedAten
from test_prefix_attention_op import MASK_CASES, concat_attention64, make_inputs, padding_mask

# ------------------------------------------------------------------------------------------------ schema guard

# The schemas of torch 2.11 (the GPU machine's), as its wheel's ATen op headers (torch/include/ATen/ops/*_ops.h)
# state them: identical to 2.14's for the four ops. Earlier releases named the flash forward's 7th and 8th results
# philox_seed and philox_offset instead of rng_state and unused; we never read them, so both are accepted.
TORCH_2_11 = {
    _sdpa_lse.FLASH_FWD: "aten::_scaled_dot_product_flash_attention(Tensor query, Tensor key, Tensor value, "
    "float dropout_p=0.0, bool is_causal=False, bool return_debug_mask=False, *, float? scale=None) -> "
    "(Tensor output, Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, SymInt max_k, "
    "Tensor rng_state, Tensor unused, Tensor debug_attn_mask)",
    _sdpa_lse.FLASH_BWD: "aten::_scaled_dot_product_flash_attention_backward(Tensor grad_out, Tensor query, "
    "Tensor key, Tensor value, Tensor out, Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, "
    "SymInt max_k, float dropout_p, bool is_causal, Tensor philox_seed, Tensor philox_offset, *, "
    "float? scale=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)",
    _sdpa_lse.EFFICIENT_FWD: "aten::_scaled_dot_product_efficient_attention(Tensor query, Tensor key, "
    "Tensor value, Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0.0, bool is_causal=False, *, "
    "float? scale=None) -> (Tensor output, Tensor log_sumexp, Tensor philox_seed, Tensor philox_offset)",
    _sdpa_lse.EFFICIENT_BWD: "aten::_scaled_dot_product_efficient_attention_backward(Tensor grad_out_, "
    "Tensor query, Tensor key, Tensor value, Tensor attn_bias, Tensor out, Tensor logsumexp, Tensor philox_seed, "
    "Tensor philox_offset, float dropout_p, bool[4] grad_input_mask, bool is_causal=False, *, float? scale=None) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
}
FLASH_FWD_OLD = TORCH_2_11[_sdpa_lse.FLASH_FWD].replace(
    "Tensor rng_state, Tensor unused", "Tensor philox_seed, Tensor philox_offset"
)


def parse(text):
    return torch._C.parse_schema(text)


def installed_text(name):
    return str(_sdpa_lse.installed_schema(name))


@pytest.mark.parametrize("name", list(_sdpa_lse.SIGNATURES))
def test_guard_accepts_installed_torch_schemas(name):
    schema = _sdpa_lse.installed_schema(name)
    assert schema is not None, f"torch {torch.__version__} has no aten::{name}"
    assert _sdpa_lse.schema_problem(schema, _sdpa_lse.SIGNATURES[name]) is None


@pytest.mark.parametrize("name", list(_sdpa_lse.SIGNATURES))
def test_guard_accepts_torch_2_11_schemas(name):
    assert _sdpa_lse.schema_problem(parse(TORCH_2_11[name]), _sdpa_lse.SIGNATURES[name]) is None


def test_guard_accepts_both_names_of_the_flash_rng_results():
    assert "rng_state" in installed_text(_sdpa_lse.FLASH_FWD) or "philox_seed" in installed_text(_sdpa_lse.FLASH_FWD)
    assert _sdpa_lse.schema_problem(parse(FLASH_FWD_OLD), _sdpa_lse.SIGNATURES[_sdpa_lse.FLASH_FWD]) is None
    assert _sdpa_lse.backend_problem("flash") is None
    assert _sdpa_lse.backend_problem("efficient") is None


@pytest.mark.parametrize(
    "name, old, new, words",
    [
        # A new required argument in the middle shifts everything we pass positionally.
        (_sdpa_lse.FLASH_FWD, "float dropout_p=0.,", "Tensor? window=None, float dropout_p=0.,", ["argument 3"]),
        (_sdpa_lse.FLASH_FWD, ", *, float? scale=None", "", ["scale"]),
        (_sdpa_lse.FLASH_FWD, "Tensor logsumexp,", "Tensor logsumexp, Tensor extra,", ["results"]),
        (_sdpa_lse.FLASH_BWD, "bool is_causal,", "bool causal,", ["argument 11"]),
        (_sdpa_lse.EFFICIENT_FWD, "bool compute_log_sumexp,", "bool compute_log_sumexp, int mask,", ["argument 5"]),
        (_sdpa_lse.EFFICIENT_FWD, "Tensor? attn_bias", "Tensor attn_bias", ["argument 3"]),
        (_sdpa_lse.EFFICIENT_BWD, "bool[4] grad_input_mask", "bool[3] grad_input_mask, int x", ["argument"]),
        (_sdpa_lse.EFFICIENT_BWD, "*, float? scale=None", "*, float? scale=None, int required", ["required keyword"]),
    ],
)
def test_guard_rejects_changed_schemas(name, old, new, words):
    text = installed_text(name)
    assert old in text, f"test setup: {old!r} not in {text}"
    problem = _sdpa_lse.schema_problem(parse(text.replace(old, new, 1)), _sdpa_lse.SIGNATURES[name])
    assert problem is not None
    for word in words:
        assert word in problem, problem


def test_guard_reports_a_missing_op(monkeypatch):
    monkeypatch.setattr(_sdpa_lse, "installed_schema", lambda name: None)
    _sdpa_lse.backend_problem.cache_clear()
    try:
        assert "has no aten::_scaled_dot_product_flash_attention" in _sdpa_lse.backend_problem("flash")
    finally:
        monkeypatch.undo()
        _sdpa_lse.backend_problem.cache_clear()


# ------------------------------------------------------------------------------------------------ backend choice


def no_problems(backend):
    return None


@pytest.mark.parametrize(
    "dtype, dim, mask, keys, backward, capability, expected",
    [
        (torch.bfloat16, 64, False, 128, False, (9, 0), "flash"),
        (torch.float16, 256, False, 128, True, (9, 0), "flash"),
        (torch.bfloat16, 128, True, 128, False, (9, 0), "efficient"),  # a mask: additive bias
        (torch.float32, 64, False, 128, False, (9, 0), "efficient"),  # float32: efficient only
        (torch.bfloat16, 64, False, 0, False, (9, 0), "none"),  # no main keys: the prefix alone
        (torch.bfloat16, 224, False, 64, True, (8, 6), "efficient"),  # FA2 backward needs sm80/90 above 192
        (torch.bfloat16, 192, False, 64, True, (8, 9), "flash"),
        (torch.bfloat16, 224, False, 64, False, (8, 6), "flash"),  # the forward is fine there
        (torch.float64, 64, False, 128, False, (9, 0), "reference"),
        (torch.bfloat16, 16, False, 128, False, (9, 0), "reference"),
        (torch.bfloat16, 264, False, 128, False, (9, 0), "reference"),
        (torch.bfloat16, 36, False, 128, False, (9, 0), "reference"),
    ],
)
def test_plan(dtype, dim, mask, keys, backward, capability, expected):
    p = plan(dtype, dim, mask, keys, backward=backward, capability=capability, problems=no_problems)
    assert p.main == expected
    assert bool(p.reason) == (expected == "reference")


def test_plan_falls_back_when_a_guard_fails():
    only_efficient = lambda backend: "changed" if backend == "flash" else None  # noqa: E731
    assert plan(torch.bfloat16, 64, False, 8, problems=only_efficient).main == "efficient"
    p = plan(torch.bfloat16, 64, False, 8, problems=lambda backend: f"{backend} changed")
    assert p.main == "reference" and "flash changed" in p.reason and "efficient changed" in p.reason
    p = plan(torch.bfloat16, 64, True, 8, problems=only_efficient)
    assert p.main == "efficient"


def test_prefix_kernels_by_dtype():
    assert isinstance(_prefix_cuda.prefix_kernels_for(torch.bfloat16), _prefix_cuda.CudaPrefixKernels)
    assert isinstance(_prefix_cuda.prefix_kernels_for(torch.float16), _prefix_cuda.CudaPrefixKernels)
    assert isinstance(_prefix_cuda.prefix_kernels_for(torch.float32), TorchPrefixKernels)


def test_reference_plan_notices_once_and_matches():
    args = make_inputs()  # float64: the reference plan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, lse = _prefix_cuda.forward(*args.values(), None, True, 0.3)
        _prefix_cuda.forward(*args.values(), None, True, 0.3)
    notices = [w for w in caught if issubclass(w.category, FastPeftFallbackWarning)]
    assert len(notices) == 1 and "float64" in str(notices[0].message)
    expected, expected_lse = concat_attention64(**args, causal=True, scale=0.3, return_lse=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("mask", [m for m in MASK_CASES if m != "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_efficient_bias_values_and_alignment(mask, dtype):
    b, hq, t, s = 2, 4, 5, 7
    attn_mask = MASK_CASES[mask](b, hq, t, s)
    bias = efficient_bias(attn_mask, False, b, hq, t, s, dtype, torch.device("cpu"))
    assert bias.shape == (b, hq, t, s) and bias.dtype == dtype and bias.stride(-1) == 1
    for size, stride in zip(bias.shape[:3], bias.stride()[:3]):
        assert stride == 0 or stride % 16 == 0, bias.stride()
    # Broadcast dims of the mask stay zero-stride (no [B, H, T, S] copy of a padding mask).
    if mask == "padding-bool":
        assert bias.stride()[1:3] == (0, 0)
    expected = reference.main_score_bias(attn_mask, False, b, hq, t, s, torch.float64, "cpu")
    torch.testing.assert_close(bias.double(), expected.to(dtype).double(), rtol=0, atol=0)


@pytest.mark.parametrize("t, s", [(1, 9), (3, 9), (6, 4)])
def test_efficient_bias_causal_is_bottom_right(t, s):
    mask = padding_mask(2, s, [s, 2])
    bias = efficient_bias(mask, True, 2, 3, t, s, torch.float16, torch.device("cpu"))
    expected = reference.main_score_bias(mask, True, 2, 3, t, s, torch.float64, "cpu")
    torch.testing.assert_close(bias.double(), expected.half().double(), rtol=0, atol=0)
    only_causal = efficient_bias(None, True, 2, 3, t, s, torch.float16, torch.device("cpu"))
    assert only_causal.stride()[:2] == (0, 0)
    assert efficient_bias(None, False, 2, 3, t, s, torch.float16, torch.device("cpu")) is None


def test_fold_rows_round_trip_and_order():
    x = randn(2, 6, 3, 4)  # B=2, Hq=6, T=3; Hkv=2, G=3
    folded = fold_rows(x, 2)
    assert folded.shape == (2, 2 * 3 * 3, 4)
    # Row (b, g, t) of kv head h is query head h * G + g.
    torch.testing.assert_close(folded[1, (1 * 3 + 2) * 3 + 1], x[1, 1 * 3 + 2, 1])
    torch.testing.assert_close(unfold_rows(folded, 2, 6, 3), x)


# ------------------------------------------------------------------------------------------------ composition

HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (6, 1)}


def run_composition(backend, args, attn_mask, causal, scale, dout, needs=(True,) * 5):
    """Forward and backward through `_prefix_cuda`'s glue with the emulated aten kernels and the torch prefix
    kernels (the fused CUDA kernels' semantics), as the CUDA path runs them."""
    raw, prefix = EmulatedAten(), TorchPrefixKernels()
    p = Plan(backend)
    inputs = tuple(args.values())
    out, lse = compose_forward(raw, prefix, p, *inputs, attn_mask, causal, scale)
    grads = compose_backward(raw, prefix, p, dout, *inputs, attn_mask, out, lse, causal, scale, list(needs))
    return out, lse, grads, raw.calls


def expected_grads(args, attn_mask, causal, scale, dout):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in args.items()}
    out, lse = concat_attention64(**leaves, attn_mask=attn_mask, causal=causal, scale=scale, return_lse=True)
    return out.detach(), lse, torch.autograd.grad(out, list(leaves.values()), dout)


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t, s", [(5, 5), (1, 9), (3, 9), (6, 4)], ids=["square", "decode", "chunk", "t>s"])
def test_flash_composition_matches_concatenation(heads, causal, t, s):
    hq, hkv = HEADS[heads]
    args = make_inputs(hq=hq, hkv=hkv, t=t, s=s)
    dout = randn(2, hq, t, 8)
    out, lse, grads, calls = run_composition("flash", args, None, causal, 0.4, dout)
    expected_out, expected_lse, expected = expected_grads(args, None, causal, 0.4, dout)
    assert calls == ["flash_forward", "flash_backward"]
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-10, atol=1e-10)
    for name, g, e in zip(args, grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("mask", list(MASK_CASES))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t, s", [(5, 7), (7, 7), (1, 9)], ids=["rect", "square", "decode"])
def test_efficient_composition_matches_concatenation(heads, mask, causal, t, s):
    hq, hkv = HEADS[heads]
    args = make_inputs(hq=hq, hkv=hkv, t=t, s=s)
    attn_mask = MASK_CASES[mask](2, hq, t, s)
    dout = randn(2, hq, t, 8)
    out, lse, grads, calls = run_composition("efficient", args, attn_mask, causal, 0.4, dout)
    expected_out, expected_lse, expected = expected_grads(args, attn_mask, causal, 0.4, dout)
    groups = hq // hkv
    assert calls == ["efficient_forward"] * groups + ["efficient_backward"] * groups
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-10, atol=1e-10)
    for name, g, e in zip(args, grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["flash", "efficient"])
def test_rows_without_main_keys_take_the_prefix_alone(backend):
    """Flash marks such rows with LSE +inf (causal, T > S), the efficient kernel with -inf and a NaN output."""
    args = make_inputs(t=6, s=4)
    if backend == "flash":
        attn_mask, causal = None, True  # rows 0 and 1 see no main key
    else:
        attn_mask, causal = padding_mask(2, 4, [4, 0]), False  # batch 1 sees no main key
    out, lse, grads, _ = run_composition(backend, args, attn_mask, causal, 0.5, randn(2, 4, 6, 8))
    expected_out, expected_lse, _ = expected_grads(args, attn_mask, causal, 0.5, randn(2, 4, 6, 8))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-10, atol=1e-10)


def test_no_main_keys_at_all():
    args = make_inputs(s=0)
    dout = randn(2, 4, 5, 8)
    out, lse, grads, calls = run_composition("none", args, None, False, 0.3, dout)
    expected_out, expected_lse, expected = expected_grads(args, None, False, 0.3, dout)
    assert calls == []
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10)
    for name, g, e in zip(args, grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["flash", "efficient"])
@pytest.mark.parametrize(
    "needs", [(False, False, False, True, True), (True, False, False, False, False), (False, True, True, False, True)]
)
def test_composition_returns_only_needed_gradients(backend, needs):
    args = make_inputs(hq=4, hkv=2)
    dout = randn(2, 4, 5, 8)
    attn_mask = padding_mask(2, 7, [7, 3]) if backend == "efficient" else None
    _, _, grads, calls = run_composition(backend, args, attn_mask, True, 0.3, dout, needs)
    _, _, expected = expected_grads(args, attn_mask, True, 0.3, dout)
    if not any(needs[:3]):
        assert not any("backward" in c for c in calls), "no main backward when only prefix gradients are needed"
    for name, g, e, n in zip(args, grads, expected, needs):
        if n:
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
        else:
            assert g.numel() == 0, name


def test_composition_with_strided_inputs():
    """q in the [B, T, H, D] memory layout transformers uses, as a [B, H, T, D] view; v with a strided head dim
    (the kernels need it contiguous: the glue copies). Gradients come back contiguous, as the op's fake says."""
    args = make_inputs(hq=4, hkv=2, t=5, s=5)
    args["q"] = randn(2, 5, 4, 8).transpose(1, 2)
    args["v"] = randn(2, 2, 8, 5).transpose(2, 3)
    dout = randn(2, 5, 4, 8).transpose(1, 2)
    for backend, mask in (("flash", None), ("efficient", padding_mask(2, 5, [5, 2]))):
        out, _, grads, _ = run_composition(backend, args, mask, True, 0.3, dout)
        expected_out, _, expected = expected_grads(args, mask, True, 0.3, dout)
        torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10)
        assert out.is_contiguous()
        for g, e in zip(grads, expected):
            assert g.is_contiguous()
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_public_op_still_runs_the_reference_on_cpu():
    """Without a GPU the op never reaches the CUDA glue (kernels_usable is False on the CPU)."""
    args = make_inputs(dtype=torch.float32)
    out = fastpeft.prefix_attention(**args, causal=True)
    torch.testing.assert_close(out.double(), concat_attention64(**args, causal=True), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not fastpeft.extension_loaded(), reason="needs the compiled extension (fastpeft._C)")
def test_kernels_are_registered_with_the_schemas_the_glue_calls():
    """`CudaPrefixKernels` calls these two ops positionally: their schemas must stay as written here."""
    expected = {
        "prefix_forward": "fastpeft_cuda::prefix_forward(Tensor q, Tensor prefix_k, Tensor prefix_v, Tensor? out_main, "
        "Tensor? lse_main, float scale) -> (Tensor, Tensor)",
        "prefix_backward": "fastpeft_cuda::prefix_backward(Tensor dout, Tensor q, Tensor prefix_k, Tensor prefix_v, "
        "Tensor out, Tensor lse, Tensor? dq_main, float scale, bool need_dq, bool need_dprefix) "
        "-> (Tensor, Tensor, Tensor)",
    }
    for name, schema in expected.items():
        assert str(getattr(torch.ops.fastpeft_cuda, name).default._schema) == schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastpeft_cuda::{name}", "CUDA")


@pytest.mark.parametrize("backend", ["flash", "efficient"])
@pytest.mark.parametrize("heads", ["mha", "gqa"])
def test_glue_calls_the_installed_private_ops_with_valid_arguments(backend, heads):
    """The real aten calls (`AtenAttention`) through the glue, on meta tensors: the arguments parse against the
    installed schemas and the results have the shapes the glue expects (flash LSE [B, Hq, T], efficient padded)."""
    hq, hkv = HEADS[heads]
    b, t, s, d, length = 2, 37, 37, 64, 5

    def meta(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16, device="meta")

    q, k, v = meta(b, hq, t, d), meta(b, hkv, s, d), meta(b, hkv, s, d)
    mask = torch.ones(b, 1, 1, s, dtype=torch.bool, device="meta") if backend == "efficient" else None
    raw = _sdpa_lse.AtenAttention()
    o_main, l_main = _prefix_cuda.main_forward(raw, backend, q, k, v, mask, True, 0.125)
    assert o_main.shape == q.shape and l_main.shape == (b, hq, t) and l_main.dtype == torch.float32
    out, lse = meta(b, hq, t, d), torch.empty(b, hq, t, device="meta")
    dq, dk, dv = _prefix_cuda.main_backward(raw, backend, meta(b, hq, t, d), q, k, v, mask, out, lse, True, 0.125,
                                            (True, True, True))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
