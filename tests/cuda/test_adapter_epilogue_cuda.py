"""The adapter epilogue kernel (out = residual + s * (up + bias)) on a GPU. Skips without one."""

from __future__ import annotations

import pytest
import torch

import fastpeft
from helpers import requires_kernels

pytestmark = requires_kernels


def poison_allocator(device="cuda"):
    """Fill and free a large block so the next allocations start out as NaN: catches unwritten output elements."""
    block = torch.full((64 * 1024 * 1024,), float("nan"), dtype=torch.float32, device=device)
    del block


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("cols", [64, 4096, 67], ids=["vector", "vector-wide", "scalar-odd"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("learned", [True, False])
def test_epilogue_matches_float64(dtype, cols, bias, learned):
    rows = 257
    residual = torch.randn(rows, cols, device="cuda").to(dtype)
    up = torch.randn(rows, cols, device="cuda").to(dtype)
    b = torch.randn(cols, device="cuda").to(dtype) if bias else None
    scale_tensor = torch.tensor(-2.5, device="cuda") if learned else None
    poison_allocator()
    out = torch.ops.fastpeft_cuda.adapter_epilogue(residual, up, b, scale_tensor, 0.75)
    s = -2.5 if learned else 0.75
    expected = residual.double() + s * (up.double() + (b.double() if bias else 0))
    assert not out.isnan().any()
    # One rounding of the float32 result to dtype: half an ulp of the output, relative.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), expected, rtol=eps, atol=eps * 4)


def test_epilogue_strided_rows_and_empty():
    base = torch.randn(10, 256, device="cuda", dtype=torch.bfloat16)
    residual = base[:, :128]  # row stride 256
    up = torch.randn(10, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.ops.fastpeft_cuda.adapter_epilogue(residual, up, None, None, 2.0)
    torch.testing.assert_close(out.double(), residual.double() + 2.0 * up.double(), rtol=1e-2, atol=1e-2)
    empty = torch.ops.fastpeft_cuda.adapter_epilogue(residual[:0], up[:0], None, None, 2.0)
    assert empty.shape == (0, 128)


def test_adapter_op_runs_the_kernel_path_on_cuda():
    x = torch.randn(33, 64, device="cuda", dtype=torch.float64, requires_grad=True)
    h = torch.randn(33, 48, device="cuda", dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(8, 64, device="cuda", dtype=torch.float64, requires_grad=True)
    w_up = torch.randn(48, 8, device="cuda", dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.5, device="cuda", dtype=torch.float64, requires_grad=True)
    y = fastpeft.adapter(x, h, w_down, w_up, scale=scale, activation="gelu")
    with fastpeft.disable_kernels():
        y_ref = fastpeft.adapter(x, h, w_down, w_up, scale=scale, activation="gelu")
    torch.testing.assert_close(y, y_ref)
    assert torch.autograd.gradcheck(
        lambda *t: fastpeft.adapter(t[0], t[1], t[2], t[3], scale=t[4], activation="gelu"),
        (x[:4], h[:4], w_down, w_up, scale),
    )
