"""The adapter's CUDA path planned and orchestrated, tested on the CPU (fastpeft/ops/_adapter_cuda.py).

The CUDA kernel ops are stood in by `EmulatedKernels` (their contract in float64), so these tests check everything
around the kernels without a GPU: which dtypes take them, how K is split, which op gets which arguments, which
gradients are computed, and that the results match the reference. tests/cuda/test_adapter_fused_cuda.py checks the
real kernels against the same contract on a GPU.
"""

from __future__ import annotations

import importlib
import itertools
import math
import warnings

import pytest
import torch

import fastpeft
from adapter_kernel_contract import EmulatedKernels
from fastpeft import reference
from fastpeft._notice import FastPeftFallbackWarning
from fastpeft.ops import _adapter_cuda as cuda_path
from helpers import randn

adapter_module = importlib.import_module("fastpeft.ops.adapter")  # the module; fastpeft.ops.adapter is the function

ACTIVATIONS = list(reference.ACTIVATIONS)
H100_SMS = 132

# ------------------------------------------------------------------------------------------------ plan


@pytest.mark.skipif(not fastpeft.extension_loaded(), reason="needs the compiled extension (fastpeft._C)")
def test_tile_constants_match_the_extension():
    tiles = torch.ops.fastpeft_cuda.adapter_gemm_tiles()
    expected = [
        cuda_path.SKINNY_BLOCK_M,
        cuda_path.SKINNY_BLOCK_N,
        cuda_path.WIDE_BLOCK_M,
        cuda_path.WIDE_BLOCK_N,
        cuda_path.BLOCK_K[torch.bfloat16],
        cuda_path.BLOCK_K[torch.float32],
    ]
    assert tiles == expected
    assert cuda_path.BLOCK_K[torch.float16] == cuda_path.BLOCK_K[torch.bfloat16]


def test_kernel_dtypes_and_fallback_reason():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert cuda_path.fallback_reason(dtype) is None
    reason = cuda_path.fallback_reason(torch.float64)
    assert "torch.float64" in reason and "float16, bfloat16 and float32" in reason


def test_normalised_splits_never_leave_a_split_empty():
    for steps in range(0, 300):
        for requested in range(1, 70):
            splits = cuda_path.normalised_splits(steps, requested)
            assert 1 <= splits <= max(1, min(steps, requested)), (steps, requested, splits)
            if splits > 1:
                per_split = math.ceil(steps / splits)
                assert per_split * (splits - 1) < steps, "the last split would be empty"
                assert per_split * splits >= steps, "steps left uncovered"
            # The binding normalises again: the plan's answer must be a fixed point.
            assert cuda_path.normalised_splits(steps, splits) == splits


@pytest.mark.parametrize(
    "rows, cols, depth, dtype, expected",
    [
        (0, 64, 4096, torch.bfloat16, 1),  # nothing to do
        (65536, 64, 4096, torch.bfloat16, 1),  # 512 CTAs already
        (16384, 64, 4096, torch.bfloat16, 3),  # 128 CTAs -> 3 splits of 43 steps
        (2048, 64, 4096, torch.bfloat16, 16),  # 16 CTAs -> 16 splits of 8 steps
        (2048, 64, 768, torch.bfloat16, 3),  # 24 steps: at most 3 splits of 8
        (1, 16, 4096, torch.float32, 32),  # one CTA: capped at MAX_SPLITS
        (1, 16, 200, torch.float16, 1),  # 7 steps: too short to split
        (2048, 1024, 4096, torch.bfloat16, 2),  # 16 x 16 CTAs -> 2 splits
    ],
)
def test_skinny_splits_examples(rows, cols, depth, dtype, expected):
    assert cuda_path.skinny_splits(rows, cols, depth, dtype, H100_SMS) == expected


def test_skinny_splits_properties():
    for rows, cols, depth, dtype in itertools.product(
        [0, 1, 7, 128, 1000, 2048, 16384, 65536], [1, 16, 64, 65, 512, 1024], [8, 64, 768, 4096, 16384],
        [torch.bfloat16, torch.float32],
    ):
        splits = cuda_path.skinny_splits(rows, cols, depth, dtype, H100_SMS)
        steps = math.ceil(depth / cuda_path.BLOCK_K[dtype])
        ctas = math.ceil(rows / cuda_path.SKINNY_BLOCK_M) * math.ceil(cols / cuda_path.SKINNY_BLOCK_N)
        assert 1 <= splits <= cuda_path.MAX_SPLITS
        assert cuda_path.normalised_splits(steps, splits) == splits
        if splits > 1:
            assert ctas < cuda_path.TARGET_CTAS_PER_SM * H100_SMS, "split although the rows fill the GPU"
            assert math.ceil(steps / splits) >= cuda_path.MIN_STEPS_PER_SPLIT
            # The float32 partials stay small: split only when N * r is small.
            assert splits * rows * cols * 4 <= 64 * 2**20, (rows, cols, depth, splits)


# ------------------------------------------------------------------------------------------------ fallback


def test_float64_runs_the_reference_path_with_one_notice():
    x, h = randn(5, 16), randn(5, 12)
    w_down, w_up, b_down, b_up = randn(4, 16), randn(12, 4), randn(4), randn(12)
    args = (x, h, w_down, w_up, b_down, b_up, None, 2.0, "gelu")
    with pytest.warns(FastPeftFallbackWarning, match="float64 is not a kernel dtype"):
        y, z = cuda_path.forward(*args)
    expected_y, expected_z = reference.adapter_forward(*args)
    assert torch.equal(y, expected_y) and torch.equal(z, expected_z)
    dy = randn(5, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the notice is shown once per process
        cuda_path.forward(*args)
        grads = cuda_path.backward(dy, x, w_down, w_up, b_up, z, None, 2.0, "gelu", False, [True] * 6)
    expected = reference.adapter_backward(dy, x, w_down, w_up, b_up, z, None, 2.0, "gelu", False, [True] * 6)
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)


# ------------------------------------------------------------------------------------------------ orchestration


@pytest.fixture
def emulated(monkeypatch):
    """Run the CUDA path on the CPU with the kernel ops emulated (and the public op believing kernels are usable)."""
    kernels = EmulatedKernels()
    monkeypatch.setattr(cuda_path, "_ops", lambda: kernels)
    monkeypatch.setattr(cuda_path, "_sm_count", lambda index: H100_SMS)
    monkeypatch.setattr(adapter_module, "kernels_usable", lambda device: fastpeft.kernels_enabled())
    return kernels


def _inputs(n, d_in, d_out, r, bias, sequential, learned, grad=True):
    def leaf(*shape, scale=1.0):
        return randn(*shape, dtype=torch.float32, scale=scale, requires_grad=grad)

    x = leaf(n, d_in)
    return dict(
        x=x,
        h=x if sequential else leaf(n, d_out),
        w_down=leaf(r, d_in, scale=d_in**-0.5),
        w_up=leaf(d_out, r, scale=r**-0.5),
        b_down=leaf(r) if bias else None,
        b_up=leaf(d_out) if bias else None,
        scale=torch.tensor(0.7, requires_grad=grad) if learned else 1.5,
    )


def _leaves(args):
    seen, out = set(), []
    for name, value in args.items():
        if isinstance(value, torch.Tensor) and value.requires_grad and id(value) not in seen:
            seen.add(id(value))
            out.append((name, value))
    return out


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias, sequential, learned", [(True, False, True), (False, True, False), (True, True, True)])
def test_public_op_on_the_emulated_kernels_matches_float64(emulated, activation, bias, sequential, learned):
    args = _inputs(9, 24, 24 if sequential else 40, 5, bias, sequential, learned)
    dy = randn(9, args["h"].shape[1], dtype=torch.float32)
    y = fastpeft.adapter(**args, activation=activation)
    leaves = _leaves(args)
    grads = torch.autograd.grad(y, [t for _, t in leaves], dy)

    args64 = {k: (v.detach().double().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
              for k, v in args.items()}
    if sequential:
        args64["h"] = args64["x"]
    leaves64 = _leaves(args64)
    with fastpeft.disable_kernels():  # the reference path, forward and backward
        y64 = fastpeft.adapter(**args64, activation=activation)
        grads64 = torch.autograd.grad(y64, [t for _, t in leaves64], dy.double())

    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for (name, _), g, g64 in zip(leaves, grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    names = [call[0] for call in emulated.calls]
    assert names == ["adapter_shrink", "adapter_expand", "adapter_grad_z", "adapter_grad_x"]
    assert emulated.calls[3] == ("adapter_grad_x", sequential), "dy joins dx exactly when x is h"


NEED_NAMES = ["dx", "dw_down", "db_down", "dw_up", "db_up", "dscale"]


@pytest.mark.parametrize("needs", [list(n) for n in itertools.product([False, True], repeat=6) if any(n)])
def test_backward_computes_exactly_what_is_needed(emulated, needs):
    n, d_in, d_out, r = 7, 16, 24, 3
    x, w_down, w_up, b_up = randn(n, d_in), randn(r, d_in), randn(d_out, r), randn(d_out)
    z, dy, s = randn(n, r), randn(n, d_out), randn(())
    f32 = [t.float() for t in (dy, x, w_down, w_up, b_up, z, s)]
    grads = cuda_path.backward(*f32, 1.0, "silu", False, needs)
    expected = reference.adapter_backward(dy, x, w_down, w_up, b_up, z, s, 1.0, "silu", False, needs)
    ptrs = set()
    for name, needed, g, e in zip(NEED_NAMES, needs, grads, expected):
        if needed:
            assert g.shape == e.shape, name
            torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
            assert g.data_ptr() not in ptrs, f"{name} aliases another output"
            ptrs.add(g.data_ptr())
        else:
            assert g.numel() == 0, f"{name} was not asked for"
    calls = {call[0]: call for call in emulated.calls}
    need_dz = needs[0] or needs[1] or needs[2]
    assert ("adapter_grad_z" in calls) == need_dz
    assert ("adapter_grad_x" in calls) == needs[0]
    if need_dz:
        _, _, want_act, want_colsum = calls["adapter_grad_z"]
        assert want_act == (needs[3] or needs[5]), "act(z) is written only for dW_up or the scale's gradient"
        assert want_colsum == (needs[4] or needs[5]), "colsum(dy) only for db_up or the scale's gradient"


def test_backward_without_learned_scale_gives_no_scale_gradient(emulated):
    x, w_down, w_up, z, dy = (t.float() for t in (randn(4, 8), randn(2, 8), randn(8, 2), randn(4, 2), randn(4, 8)))
    grads = cuda_path.backward(dy, x, w_down, w_up, None, z, None, 3.0, "relu", True, [True] * 6)
    assert grads[5].numel() == 0
    expected = reference.adapter_backward(*(t.double() for t in (dy, x, w_down, w_up)), None, z.double(), None, 3.0,
                                          "relu", True, [True] * 6)
    for g, e in zip(grads[:5], expected[:5]):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4)


def test_empty_batch_on_the_emulated_kernels(emulated):
    args = _inputs(0, 16, 8, 4, True, False, True)
    y = fastpeft.adapter(**args, activation="gelu")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.equal(args["w_down"].grad, torch.zeros_like(args["w_down"]))
    assert torch.equal(args["b_up"].grad, torch.zeros_like(args["b_up"]))
    assert args["scale"].grad == 0
