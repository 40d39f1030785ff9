"""The contract of the adapter kernel ops (`torch.ops.fastpeft_cuda.adapter_*`), written as float64 PyTorch.

`EmulatedKernels` computes what each CUDA op computes, in float64, rounded once to the output dtype. It serves
twice: the CPU tests stand it in for the CUDA ops to test fastpeft/ops/_adapter_cuda.py's orchestration (which op
gets which arguments, which gradients are computed) against the reference; the GPU tests compare each real op with
it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastpeft import reference


def _f64(t):
    return None if t is None else t.double()


def _scale(scale_tensor, scale):
    return scale if scale_tensor is None else scale_tensor.double().reshape(())


class EmulatedKernels:
    """Stand-in for torch.ops.fastpeft_cuda with the same op names and signatures; records the calls it gets."""

    def __init__(self):
        self.calls = []

    def adapter_shrink(self, x, w_down, b_down, activation, splits):
        self.calls.append(("adapter_shrink", splits))
        assert isinstance(splits, int) and splits >= 1
        z = F.linear(x.double(), w_down.double(), _f64(b_down)).to(x.dtype)
        return z, reference.activate(z.double(), activation).to(x.dtype)

    def adapter_expand(self, act, w_up, residual, b_up, scale_tensor, scale):
        self.calls.append(("adapter_expand", residual is not None))
        up = F.linear(act.double(), w_up.double(), _f64(b_up))
        base = 0 if residual is None else residual.double()
        return (base + _scale(scale_tensor, scale) * up).to(act.dtype)

    def adapter_grad_z(self, dy, w_up, z, scale_tensor, scale, activation, splits, want_act, want_dy_colsum):
        self.calls.append(("adapter_grad_z", splits, want_act, want_dy_colsum))
        assert isinstance(splits, int) and splits >= 1
        da = dy.double().matmul(w_up.double())
        dz = (_scale(scale_tensor, scale) * da * reference.activation_derivative(z.double(), activation)).to(dy.dtype)
        act = reference.activate(z.double(), activation).to(dy.dtype) if want_act else dy.new_empty(0, 0)
        colsum = dy.double().sum(0).float() if want_dy_colsum else dy.new_empty(0, dtype=torch.float32)
        return dz, act, colsum

    def adapter_grad_x(self, dz, w_down, dy):
        self.calls.append(("adapter_grad_x", dy is not None))
        dx = dz.double().matmul(w_down.double())
        if dy is not None:
            dx = dx + dy.double()
        return dx.to(dz.dtype)
