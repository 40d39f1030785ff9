"""`fastpeft.adapter`: the bottleneck adapter / LoRA op, y = h + s * (act(x w_down^T + b_down) w_up^T + b_up).

Two custom ops carry the work, so that the whole adapter is one node for torch.compile and CUDA graphs:

- `fastpeft::adapter_fwd(x, h?, w_down, w_up, b_down?, b_up?, scale_tensor?, scale, activation) -> (y, z)`
  on 2-D x [N, d_in]; h None means h is x (sequential insertion).
- `fastpeft::adapter_bwd(...)` returns (dx, dw_down, db_down, dw_up, db_up, dscale), each only when needed.

Saved for backward: x (which is also h in the sequential case), w_down, w_up, b_up, the scale tensor, and z, the
[N, r] pre-activation. Nothing of size [N, d] beyond x, which the caller already holds.

Each op runs the CUDA kernels when they are built and usable for the inputs, and `fastpeft.reference` otherwise.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fastpeft import reference
from fastpeft._extension import kernels_usable
from fastpeft.ops import _adapter_cuda
from fastpeft.ops._checks import (
    autocast_inputs,
    check_same_dtype_and_device,
    check_shape,
    check_tensor,
)

OP = "fastpeft.adapter"


@torch.library.custom_op("fastpeft::adapter_fwd", mutates_args=())
def adapter_fwd(
    x: Tensor,
    h: Optional[Tensor],
    w_down: Tensor,
    w_up: Tensor,
    b_down: Optional[Tensor],
    b_up: Optional[Tensor],
    scale_tensor: Optional[Tensor],
    scale: float,
    activation: str,
) -> tuple[Tensor, Tensor]:
    args = (x, h, w_down, w_up, b_down, b_up, scale_tensor, scale, activation)
    if kernels_usable(x.device):
        return _adapter_cuda.forward(*args)
    return reference.adapter_forward(*args)


@adapter_fwd.register_fake
def _adapter_fwd_fake(x, h, w_down, w_up, b_down, b_up, scale_tensor, scale, activation):
    n = x.shape[0]
    return x.new_empty(n, w_up.shape[0]), x.new_empty(n, w_down.shape[0])


@torch.library.custom_op("fastpeft::adapter_bwd", mutates_args=())
def adapter_bwd(
    dy: Tensor,
    x: Tensor,
    w_down: Tensor,
    w_up: Tensor,
    b_up: Optional[Tensor],
    z: Tensor,
    scale_tensor: Optional[Tensor],
    scale: float,
    activation: str,
    sequential: bool,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (dy, x, w_down, w_up, b_up, z, scale_tensor, scale, activation, sequential, needs)
    if kernels_usable(dy.device):
        return _adapter_cuda.backward(*args)
    return reference.adapter_backward(*args)


@adapter_bwd.register_fake
def _adapter_bwd_fake(dy, x, w_down, w_up, b_up, z, scale_tensor, scale, activation, sequential, needs):
    need_dx, need_dw_down, need_db_down, need_dw_up, need_db_up, need_dscale = needs
    r = w_down.shape[0]

    def grad(needed, *shape, like=dy):
        return like.new_empty(shape if needed else (0,))

    return (
        grad(need_dx, *x.shape),
        grad(need_dw_down, *w_down.shape),
        grad(need_db_down, r),
        grad(need_dw_up, *w_up.shape),
        grad(need_db_up, w_up.shape[0]),
        grad(need_dscale and scale_tensor is not None, *(scale_tensor.shape if scale_tensor is not None else ()),
             like=scale_tensor if scale_tensor is not None else dy),
    )


def _setup_context(ctx, inputs, output):
    x, h, w_down, w_up, b_down, b_up, scale_tensor, scale, activation = inputs
    _, z = output
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(x, w_down, w_up, b_up, z, scale_tensor)
    ctx.scale = scale
    ctx.activation = activation
    ctx.sequential = h is None


def _backward(ctx, dy, _dz):
    x, w_down, w_up, b_up, z, scale_tensor = ctx.saved_tensors
    (need_x, need_h, need_w_down, need_w_up, need_b_down, need_b_up, need_scale) = ctx.needs_input_grad[:7]
    needs = [need_x, need_w_down, need_b_down, need_w_up, need_b_up, need_scale]
    if any(needs):
        dx, dw_down, db_down, dw_up, db_up, dscale = adapter_bwd(
            dy, x, w_down, w_up, b_up, z, scale_tensor, ctx.scale, ctx.activation, ctx.sequential, needs
        )
    else:
        dx = dw_down = db_down = dw_up = db_up = dscale = None
    return (
        dx if need_x else None,
        dy if need_h else None,
        dw_down if need_w_down else None,
        dw_up if need_w_up else None,
        db_down if need_b_down else None,
        db_up if need_b_up else None,
        dscale if need_scale else None,
        None,
        None,
    )


adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


def adapter(
    x: Tensor,
    h: Tensor,
    w_down: Tensor,
    w_up: Tensor,
    b_down: Optional[Tensor] = None,
    b_up: Optional[Tensor] = None,
    scale: Union[float, Tensor] = 1.0,
    activation: str = "relu",
) -> Tensor:
    """Bottleneck adapter: `h + scale * (act(x @ w_down.T + b_down) @ w_up.T + b_up)`.

    Args:
        x: input of the adapter, [..., d_in].
        h: the hidden state the adapter adds onto, [..., d_out] with the leading dims of x. Passing the same tensor
            as x and h (`x is h`) is sequential insertion; gradients account for both uses.
        w_down: down-projection, `nn.Linear` layout [r, d_in].
        w_up: up-projection, `nn.Linear` layout [d_out, r] (LoRA: A is w_down, B is w_up, activation "identity").
        b_down, b_up: optional biases [r] and [d_out].
        scale: a Python float, or a 0-d / 1-element tensor (it may require grad: a learned scale).
        activation: "identity", "relu", "gelu" (erf), "gelu_tanh", "silu" or "tanh".

    Returns:
        y with h's shape. Under autocast, inputs are cast to the autocast dtype as `nn.Linear` would be.

    For backward the op saves x, the weights, the scale and the [N, r] pre-activation: nothing of size [N, d_out].
    """
    sequential = x is h
    if not isinstance(x, Tensor):
        raise TypeError(f"{OP}: 'x' must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(h, Tensor):
        raise TypeError(f"{OP}: 'h' must be a torch.Tensor, got {type(h).__name__}")
    scale_tensor, scale_value = _split_scale(scale, x)
    x, h, w_down, w_up, b_down, b_up = autocast_inputs([x, h, w_down, w_up, b_down, b_up])
    if sequential:
        h = x
    _check_adapter_args(x, h, w_down, w_up, b_down, b_up, activation)

    d_in, d_out = x.shape[-1], h.shape[-1]
    x2 = x.reshape(-1, d_in)
    h2 = None if sequential else h.reshape(-1, d_out)
    y, _ = adapter_fwd(x2, h2, w_down, w_up, b_down, b_up, scale_tensor, scale_value, activation)
    return y.view(h.shape)


def _split_scale(scale, x: Tensor) -> tuple[Optional[Tensor], float]:
    """(scale_tensor, scale_float): a tensor scale travels as a tensor (no host sync), a number as a float."""
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{OP}: 'scale' must be a float or a 1-element tensor, got shape {tuple(scale.shape)}")
        if not scale.is_floating_point():
            raise TypeError(f"{OP}: 'scale' tensor must be floating point, got {scale.dtype}")
        if scale.device != x.device:
            raise ValueError(f"{OP}: 'scale' must be on the device of 'x' ({x.device}), got {scale.device}")
        return scale, 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{OP}: 'scale' must be a float or a 1-element tensor, got {type(scale).__name__}")
    return None, float(scale)


def _check_adapter_args(x, h, w_down, w_up, b_down, b_up, activation) -> None:
    check_tensor(OP, "x", x, min_ndim=1)
    check_tensor(OP, "h", h, min_ndim=1)
    check_tensor(OP, "w_down", w_down, ndim=2)
    check_tensor(OP, "w_up", w_up, ndim=2)
    for name, bias in (("b_down", b_down), ("b_up", b_up)):
        if bias is not None:
            check_tensor(OP, name, bias, ndim=1)
    check_same_dtype_and_device(
        OP, "x", x, [("h", h), ("w_down", w_down), ("w_up", w_up), ("b_down", b_down), ("b_up", b_up)]
    )
    if h.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"{OP}: 'h' must have the leading dims of 'x' {tuple(x.shape[:-1])}, got shape {tuple(h.shape)}"
        )
    r, d_in = w_down.shape
    d_out = h.shape[-1]
    if r < 1:
        raise ValueError(f"{OP}: 'w_down' must have at least one row (the bottleneck r), got shape {tuple(w_down.shape)}")
    check_shape(OP, "w_down", w_down, (r, x.shape[-1]), "[r, d_in]")
    check_shape(OP, "w_up", w_up, (d_out, r), "[d_out, r]")
    if b_down is not None:
        check_shape(OP, "b_down", b_down, (r,), "[r]")
    if b_up is not None:
        check_shape(OP, "b_up", b_up, (d_out,), "[d_out]")
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"{OP}: 'activation' must be one of {reference.ACTIVATIONS}, got {activation!r}")
