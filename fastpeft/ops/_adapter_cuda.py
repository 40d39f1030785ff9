"""CUDA path of the adapter op (called only when `kernels_usable` says the extension can run on the device).

The projections run as cuBLAS matrix products; the output epilogue h + s * (up + b_up) is fastpeft's own kernel
(`torch.ops.fastpeft_cuda.adapter_epilogue`), so the [N, d_out] up-projection is read once and y written once.
Backward runs the reference math (cuBLAS products).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastpeft import reference


def forward(x, h, w_down, w_up, b_down, b_up, scale_tensor, scale, activation):
    z = F.linear(x, w_down, b_down)
    up = F.linear(reference.activate(z, activation), w_up)
    residual = x if h is None else h
    y = torch.ops.fastpeft_cuda.adapter_epilogue(residual, up, b_up, scale_tensor, scale)
    return y, z


def backward(dy, x, w_down, w_up, b_up, z, scale_tensor, scale, activation, sequential, needs):
    return reference.adapter_backward(dy, x, w_down, w_up, b_up, z, scale_tensor, scale, activation, sequential, needs)
