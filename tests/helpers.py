"""Shared test helpers: random inputs, the CUDA skip markers, the error bound tied to eager PyTorch."""

from __future__ import annotations

import math

import pytest
import torch

import fastpeft

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none visible)")
requires_kernels = pytest.mark.skipif(
    not (HAS_CUDA and fastpeft.extension_loaded()),
    reason="needs a CUDA GPU and the compiled extension (fastpeft._C)",
)


def randn(*shape, dtype=torch.float64, device="cpu", requires_grad=False, scale=1.0):
    """Random normal values (never zeros), optionally a leaf that requires grad."""
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_error_bounded(actual, eager, truth, *, factor=2.0, atol=1e-6, name="output"):
    """The error of `actual` against the float64 `truth` is at most `factor` times the error of the same
    computation in eager PyTorch at the same precision (plus `atol` for values eager happens to get exact)."""
    err, eager_err = max_error(actual, truth), max_error(eager, truth)
    assert err <= factor * eager_err + atol, f"{name}: error {err:.3e} > {factor} x eager error {eager_err:.3e} + {atol}"


def activation64(z: torch.Tensor, name: str) -> torch.Tensor:
    """The activations written out from their definitions: the tests' truth, independent of fastpeft.reference."""
    if name == "identity":
        return z
    if name == "relu":
        return torch.where(z > 0, z, torch.zeros_like(z))
    if name == "gelu":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    if name == "silu":
        return z / (1 + torch.exp(-z))
    if name == "tanh":
        return (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z))
    raise ValueError(f"unknown activation {name!r}")
