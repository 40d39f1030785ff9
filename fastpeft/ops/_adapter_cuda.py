"""CUDA path of the adapter op (called only when `kernels_usable` says the extension can run on the device).

Forward, two fused kernels (csrc/adapter/, `torch.ops.fastpeft_cuda.*`):

    adapter_shrink   z = x W_down^T + b_down and a = act(z), [N, r]      reads x once
    adapter_expand   y = h + s * (a W_up^T + b_up), [N, d_out]           reads h once, writes y once: the
                                                                          [N, d_out] up-projection never exists
Backward:

    adapter_grad_z   dz = s * (dy W_up) * act'(z), a = act(z) and colsum(dy), in one pass over dy
    torch.mm         G = dy^T a and dW_down = dz^T x: the reductions over N, where cuBLAS is the right tool
                     (dW_up = s G, ds = <G, W_up> + <colsum(dy), b_up>)
    adapter_grad_x   dx = dz W_down (+ dy when x is h), written once
                     db_up = s colsum(dy), db_down = colsum(dz)

Every sum has a fixed order (split-K partials and per-row-block column sums are added by separate deterministic
reductions, no atomics), so results are bitwise reproducible. Launches go to the current stream with no host
synchronisation (a learned scale is read on the device), so the path is safe to capture in a CUDA graph.

Precision: float16 and bfloat16 multiply on tensor cores with float32 accumulation; float32 multiplies with
float32 FFMA (never TF32). The two `torch.mm` weight-gradient products follow PyTorch's own float32 setting
(`torch.backends.cuda.matmul.allow_tf32`, off by default), as the eager chain would. The epilogues round once,
where the eager chain rounds every intermediate.

What takes the kernels: float16, bfloat16 and float32, any N (0 included), any d_in, d_out and r, any row strides
(a copy is made only when the last dim is not contiguous). Other dtypes (float64) run `fastpeft.reference`, with a
one-time `FastPeftFallbackWarning`. The plan (which path, how to split K) is plain functions below, tested on the CPU.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from fastpeft import reference
from fastpeft._notice import notice_once

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tile sizes of csrc/adapter/gemm_params.h; tests/test_adapter_dispatch.py checks them against
# torch.ops.fastpeft_cuda.adapter_gemm_tiles(). They only steer the split plan: any split is correct.
SKINNY_BLOCK_M = 128  # rows of N per CTA of the skinny products (shrink, grad_z)
SKINNY_BLOCK_N = 64  # columns of r per CTA
WIDE_BLOCK_M = 64  # rows of N per CTA of the wide products (expand, grad_x)
WIDE_BLOCK_N = 128  # columns of d per CTA
BLOCK_K = {torch.float16: 32, torch.bfloat16: 32, torch.float32: 16}

# Split-K of the skinny products: with few rows, N alone gives too few CTAs to keep the GPU's memory system busy.
TARGET_CTAS_PER_SM = 2  # aim for this many CTAs per SM
MIN_STEPS_PER_SPLIT = 8  # each split does at least this many BLOCK_K steps (256 of d for 16-bit types)
MAX_SPLITS = 32  # bounds the float32 partials: splits * N * r, and N * r is small whenever K is split


def fallback_reason(dtype: torch.dtype) -> Optional[str]:
    """Why inputs of `dtype` cannot take the fused kernels, or None when they can. Shapes never force a fallback:
    the kernels handle any size, partial tiles and unaligned rows."""
    if dtype not in KERNEL_DTYPES:
        return f"{dtype} is not a kernel dtype (the fused kernels take float16, bfloat16 and float32)"
    return None


def normalised_splits(steps: int, splits: int) -> int:
    """The split count the kernels actually run for `splits` requested over `steps` K steps: every split does
    ceil(steps / splits) steps and none is empty (as `set_split` in csrc/bindings/adapter_binding.cpp)."""
    if steps <= 1 or splits <= 1:
        return 1
    per_split = -(-steps // min(splits, steps))
    return -(-steps // per_split)


def skinny_splits(rows: int, cols: int, depth: int, dtype: torch.dtype, sm_count: int) -> int:
    """How many ways the skinny product out [rows, cols] = A [rows, depth] . B splits its K = depth.

    One split when the row and column blocks alone give TARGET_CTAS_PER_SM CTAs per SM; otherwise enough splits to
    get there, each at least MIN_STEPS_PER_SPLIT steps long, at most MAX_SPLITS.
    """
    ctas = math.ceil(rows / SKINNY_BLOCK_M) * math.ceil(cols / SKINNY_BLOCK_N)
    steps = math.ceil(depth / BLOCK_K[dtype])
    target = TARGET_CTAS_PER_SM * sm_count
    if ctas == 0 or ctas >= target:
        return 1
    wanted = math.ceil(target / ctas)
    return normalised_splits(steps, min(wanted, steps // MIN_STEPS_PER_SPLIT, MAX_SPLITS))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _ops():
    """The kernel ops' namespace (a function, so that CPU tests can stand in an emulation of the ops' contract)."""
    return torch.ops.fastpeft_cuda


def _splits_for(a: torch.Tensor, cols: int) -> int:
    return skinny_splits(a.shape[0], cols, a.shape[1], a.dtype, _sm_count(a.device.index))


def _notice_fallback(reason: str) -> None:
    notice_once(f"adapter:{reason}", f"fastpeft.adapter runs the reference path: {reason}")


def forward(x, h, w_down, w_up, b_down, b_up, scale_tensor, scale, activation):
    reason = fallback_reason(x.dtype)
    if reason is not None:
        _notice_fallback(reason)
        return reference.adapter_forward(x, h, w_down, w_up, b_down, b_up, scale_tensor, scale, activation)
    z, a = _ops().adapter_shrink(x, w_down, b_down, activation, _splits_for(x, w_down.shape[0]))
    residual = x if h is None else h
    y = _ops().adapter_expand(a, w_up, residual, b_up, scale_tensor, scale)
    return y, z


def backward(dy, x, w_down, w_up, b_up, z, scale_tensor, scale, activation, sequential, needs):
    reason = fallback_reason(dy.dtype)
    if reason is not None:
        _notice_fallback(reason)
        return reference.adapter_backward(
            dy, x, w_down, w_up, b_up, z, scale_tensor, scale, activation, sequential, needs
        )
    need_dx, need_dw_down, need_db_down, need_dw_up, need_db_up, need_dscale = needs
    need_dscale = need_dscale and scale_tensor is not None
    need_dz = need_dx or need_dw_down or need_db_down
    need_g = need_dw_up or need_dscale  # G = dy^T act(z)
    need_colsum = need_db_up or (need_dscale and b_up is not None)  # colsum(dy), float32
    s = scale if scale_tensor is None else scale_tensor.reshape(())
    # Gradients not asked for are distinct empty tensors (op outputs must not alias each other).
    dx, dw_down, db_down, dw_up, db_up, dscale = (dy.new_empty(0) for _ in range(6))

    if need_dz:
        dz, a, colsum = _ops().adapter_grad_z(
            dy, w_up, z, scale_tensor, scale, activation, _splits_for(dy, z.shape[1]), need_g, need_colsum
        )
    else:  # only the up-projection's gradients: no pass over dy for dz
        a = reference.activate(z, activation) if need_g else None
        colsum = dy.sum(0, dtype=torch.float32) if need_colsum else None

    if need_g:
        g = torch.mm(dy.t(), a)
        if need_dw_up:
            dw_up = g * s
        if need_dscale:
            total = (g.float() * w_up.float()).sum()
            if b_up is not None:
                total = total + (colsum * b_up.float()).sum()
            dscale = total.to(scale_tensor.dtype).reshape(scale_tensor.shape)
    if need_db_up:
        db_up = (colsum * s).to(dy.dtype)
    if need_dw_down:
        dw_down = torch.mm(dz.t(), x)
    if need_db_down:
        db_down = dz.sum(0)
    if need_dx:
        dx = _ops().adapter_grad_x(dz, w_down, dy if sequential else None)
    return dx, dw_down, db_down, dw_up, db_up, dscale
