"""Argument checks for the public ops. Every error names the op, the argument, what was expected and what was given."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, value, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> None:
    """`value` is a floating-point tensor (of `ndim` or at least `min_ndim` dimensions)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: '{name}' must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: '{name}' must be float16, bfloat16, float32 or float64, got {value.dtype}"
        )
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{op}: '{name}' must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{op}: '{name}' must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")


def check_same_dtype_and_device(op: str, reference_name: str, reference: Tensor, others: Sequence) -> None:
    """Each (name, tensor) in `others` (None allowed) has the reference tensor's dtype and device."""
    for name, value in others:
        if value is None:
            continue
        if value.dtype != reference.dtype:
            raise TypeError(
                f"{op}: '{name}' must have the dtype of '{reference_name}' ({reference.dtype}), got {value.dtype}"
            )
        if value.device != reference.device:
            raise ValueError(
                f"{op}: '{name}' must be on the device of '{reference_name}' ({reference.device}), got {value.device}"
            )


def check_shape(op: str, name: str, value: Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{op}: '{name}' must have shape {meaning} = {tuple(expected)}, got {tuple(value.shape)}")


def autocast_inputs(tensors: Sequence[Optional[Tensor]]) -> list:
    """Cast floating tensors to the autocast dtype when autocast is on for their device, as torch.nn.Linear is."""
    device = next((t.device for t in tensors if t is not None), None)
    # Autocast exists for real devices only (torch.is_autocast_enabled("meta") raises).
    if device is None or device.type == "meta" or not torch.is_autocast_enabled(device.type):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device.type)
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]
