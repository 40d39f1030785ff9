"""The conventions of PyTorch's private attention ops that the prefix path relies on, checked on the installed torch
(2.11 on the GPU machine, 2.14 here), and the CPU emulation of them (tests/prefix_emulation.py, used by the CPU
tests of the glue) checked against the real kernels. Skips without a GPU."""

from __future__ import annotations

import pytest
import torch

from fastpeft.ops import _sdpa_lse
from fastpeft.ops._prefix_cuda import efficient_bias
from helpers import requires_kernels
from prefix_emulation import EmulatedAten

pytestmark = requires_kernels

REAL, EMU = _sdpa_lse.AtenAttention(), EmulatedAten()


def rand(*shape, dtype):
    return torch.randn(*shape, device="cuda").to(dtype)


def cpu(x):
    return x.detach().double().cpu()


def test_guards_pass_on_this_torch():
    assert _sdpa_lse.backend_problem("flash") is None, _sdpa_lse.backend_problem("flash")
    assert _sdpa_lse.backend_problem("efficient") is None, _sdpa_lse.backend_problem("efficient")


@pytest.mark.parametrize("t, s", [(64, 64), (1, 300), (17, 80), (80, 17)], ids=["square", "decode", "chunk", "t>s"])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_matches_the_emulation(t, s, causal):
    """GQA native, causal bottom-right, LSE [B, Hq, T] natural log, rows without keys: out 0 and LSE not finite."""
    torch.manual_seed(0)
    q = rand(2, 4, t, 64, dtype=torch.bfloat16)
    k, v = rand(2, 2, s, 64, dtype=torch.bfloat16), rand(2, 2, s, 64, dtype=torch.bfloat16)
    out, lse = REAL.flash_forward(q, k, v, causal, 0.125)
    e_out, e_lse = EMU.flash_forward(q.cpu(), k.cpu(), v.cpu(), causal, 0.125)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, t)
    empty = ~torch.isfinite(e_lse)
    assert torch.equal(~torch.isfinite(lse.cpu()), empty), "rows without keys differ"
    torch.testing.assert_close(cpu(lse)[~empty], e_lse[~empty].double(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cpu(out), e_out.double(), rtol=2e-2, atol=2e-2)
    assert (out[empty.cuda()] == 0).all()

    # Backward with a given (here: its own) LSE and output, GQA gradients summed over the group.
    dout = torch.randn_like(out)
    lse_all = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # the merged LSE is always finite
    grads = REAL.flash_backward(dout, q, k, v, out, lse_all, causal, 0.125)
    e_grads = EMU.flash_backward(dout.cpu(), q.cpu(), k.cpu(), v.cpu(), out.cpu(), lse_all.cpu(), causal, 0.125)
    for g, e in zip(grads, e_grads):
        torch.testing.assert_close(cpu(g), e.double(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_efficient_matches_the_emulation(dtype, causal):
    """Additive bias in q's dtype, causal top-left (T == S here), LSE padded to a multiple of 32, rows whose keys are
    all hidden have a non-finite LSE (the prefix kernel then ignores their output)."""
    torch.manual_seed(1)
    b, h, t, s = 2, 4, 45, 45
    q, k, v = (rand(b, h, n, 64, dtype=dtype) for n in (t, s, s))
    mask = torch.ones(b, 1, 1, s, dtype=torch.bool, device="cuda")
    mask[1] = False  # sequence 1 sees no key at all
    bias = efficient_bias(mask, False, b, h, t, s, dtype, q.device)
    bias_cpu = efficient_bias(mask.cpu(), False, b, h, t, s, dtype, torch.device("cpu"))  # same strides
    out, lse = REAL.efficient_forward(q, k, v, bias, causal, 0.125)
    e_out, e_lse = EMU.efficient_forward(q.cpu(), k.cpu(), v.cpu(), bias_cpu, causal, 0.125)
    assert lse.shape == (b, h, _sdpa_lse.padded_lse_length(t)) and lse.dtype == torch.float32
    lse = lse[..., :t]
    e_lse = e_lse[..., :t]
    assert not torch.isfinite(lse[1]).any(), "a row without keys must have a non-finite LSE"
    torch.testing.assert_close(cpu(lse[0]), e_lse[0].double(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cpu(out[0]), e_out[0].double(), rtol=2e-2, atol=2e-2)

    dout = torch.randn_like(out)
    merged = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    padded = torch.full((b, h, _sdpa_lse.padded_lse_length(t)), float("inf"), device="cuda")
    padded[..., :t] = merged
    out_fixed = torch.nan_to_num(out)
    grads = REAL.efficient_backward(dout, q, k, v, bias, out_fixed, padded, causal, 0.125, (True, True, True))
    e_grads = EMU.efficient_backward(dout.cpu(), q.cpu(), k.cpu(), v.cpu(), bias_cpu, out_fixed.cpu(), padded.cpu(),
                                     causal, 0.125, (True, True, True))
    for g, e in zip(grads, e_grads):
        torch.testing.assert_close(cpu(g), e.double(), rtol=3e-2, atol=3e-2)
