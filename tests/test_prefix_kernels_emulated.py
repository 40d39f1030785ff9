"""The fused prefix kernels' own source (csrc/prefix/*_kernel.cuh), run on the CPU through a CUDA shim, against the
same math in PyTorch (`TorchPrefixKernels`). Without a GPU this is how the kernels' index math, fragment layouts,
chunking, tails, padding, LSE conventions and workspaces are checked here; the GPU tests in tests/cuda/ repeat it on
the hardware (tensor cores, timing, races under compute-sanitizer).

The shim (tests/emulation/cuda_host_shim.h) runs each block as real threads with real barriers, computes mma.sync
from the lanes' fragments by the PTX layout, and poisons shared memory and workspaces with NaN.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from fastpeft.ops._prefix_torch import TorchPrefixKernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_include():
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and os.path.exists(os.path.join(base, "include", "cuda_bf16.h")):
            return os.path.join(base, "include")
    return None


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    include, compiler = cuda_include(), shutil.which("g++")
    if include is None or compiler is None:
        pytest.skip("needs g++ and the CUDA toolkit's headers (cuda_bf16.h) to compile the kernels as host code")
    path = str(tmp_path_factory.mktemp("emulation") / "prefix_kernels_host.so")
    source = os.path.join(ROOT, "tests", "emulation", "prefix_kernels_host.cpp")
    cmd = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{ROOT}/csrc", f"-I{ROOT}/tests",
           f"-I{include}", source, "-o", path]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"compiling the kernels as host code failed:\n{result.stderr[-4000:]}"
    library = ctypes.CDLL(path)
    library.emulate_prefix_forward.restype = ctypes.c_int
    library.emulate_prefix_backward.restype = ctypes.c_int
    return library


DTYPES = {torch.bfloat16: 0, torch.float16: 1}


def ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def strides3(t):
    return [ctypes.c_int64(s) for s in (t.stride()[:3] if t is not None else (0, 0, 0))]


def emulate_forward(lib, q, pk, pv, o_main, l_main, scale, row_blocks):
    b, hq, t, d = q.shape
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    rc = lib.emulate_prefix_forward(
        DTYPES[q.dtype], b, hq, pk.shape[0], t, d, pk.shape[1], ctypes.c_float(scale), ptr(q), *strides3(q),
        ptr(pk), ptr(pv), ptr(o_main), *strides3(o_main), ptr(l_main), *strides3(l_main), ptr(out), ptr(lse),
        row_blocks,
    )
    assert rc == 0, "a kernel wrote past its shared memory" if rc == 1 else f"error {rc}"
    return out, lse


def emulate_backward(lib, dout, q, pk, pv, out, lse, dq_main, scale, need_dq, need_dprefix, row_blocks):
    b, hq, t, d = q.shape
    dq = torch.empty(q.shape, dtype=q.dtype) if need_dq else None
    dpk = torch.empty(pk.shape, dtype=pk.dtype) if need_dprefix else None
    dpv = torch.empty(pv.shape, dtype=pv.dtype) if need_dprefix else None
    rc = lib.emulate_prefix_backward(
        DTYPES[q.dtype], b, hq, pk.shape[0], t, d, pk.shape[1], ctypes.c_float(scale), ptr(dout), *strides3(dout),
        ptr(q), *strides3(q), ptr(pk), ptr(pv), ptr(out), ptr(lse), ptr(dq_main), *strides3(dq_main), ptr(dq),
        ptr(dpk), ptr(dpv), row_blocks,
    )
    assert rc == 0, "a kernel wrote past its shared memory" if rc == 1 else f"error {rc}"
    return dq, dpk, dpv


def bshd(b, h, t, d, dtype):
    """A [B, H, T, D] view of [B, T, H, D] memory (the layout transformers has)."""
    return torch.randn(b, t, h, d).to(dtype).transpose(1, 2)


# (dtype, B, Hq, Hkv, T, D, L, row_blocks): the head-dim buckets 64 / 128 / 256 (D below the bucket: zero padding),
# one and several prefix chunks (forward chunk 64, 64, 32; backward chunk 64, 32, 16), tails of row tiles (64 rows),
# grouped-query attention, and more row tiles than row blocks.
FORWARD_CASES = {
    "d64-one-chunk": (torch.bfloat16, 1, 2, 1, 40, 64, 30, 1),
    "d40-padded-gqa": (torch.float16, 2, 4, 2, 17, 40, 1, 2),
    "d96-two-chunks": (torch.bfloat16, 1, 4, 2, 20, 96, 70, 3),
    "d160-two-chunks": (torch.float16, 1, 2, 1, 9, 160, 40, 1),
    "five-tiles-two-blocks": (torch.bfloat16, 2, 4, 1, 40, 64, 70, 2),
}


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_emulated_forward_matches_torch(lib, case):
    dtype, b, hq, hkv, t, d, length, row_blocks = FORWARD_CASES[case]
    torch.manual_seed(0)
    q = bshd(b, hq, t, d, dtype)
    pk, pv = torch.randn(hkv, length, d).to(dtype), torch.randn(hkv, length, d).to(dtype)
    o_main = bshd(b, hq, t, d, dtype)
    l_main = torch.randn(b, hq, t + 5)[..., :t] * 3  # a strided slice, like the efficient kernel's padded LSE
    # Every LSE convention: no main key (+inf from flash, -inf from efficient, with an unreadable O_main).
    l_main[0, 0, 1], l_main[0, hq - 1, t - 1] = float("inf"), float("-inf")
    o_main[0, 0, 1], o_main[0, hq - 1, t - 1] = float("nan"), float("nan")
    scale = d ** -0.5
    for main in (True, False):
        om, lm = (o_main, l_main) if main else (None, None)
        out, lse = emulate_forward(lib, q, pk, pv, om, lm, scale, row_blocks)
        ref_out, ref_lse = TorchPrefixKernels().forward(q.float(), pk.float(), pv.float(),
                                                        None if om is None else om.float(), lm, scale)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
        # P is rounded to the input dtype for the P . P_v product (as FlashAttention does): a few ulps.
        torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)


BACKWARD_CASES = {
    # name: (dtype, B, Hq, Hkv, T, D, L, row_blocks, need_dq, need_dprefix, strided dq_main). One chunk: the fused
    # kernel; two chunks: the dq kernel and the chunk-parallel dP kernel (sharing D when both run).
    "d64-one-chunk": (torch.bfloat16, 1, 2, 1, 40, 64, 30, 2, True, True, True),
    "d128-two-chunks": (torch.float16, 1, 2, 2, 24, 128, 40, 1, True, True, False),
    "d256-two-chunks": (torch.bfloat16, 1, 2, 1, 10, 256, 20, 1, True, True, True),
    "d40-gqa-two-chunks": (torch.bfloat16, 2, 4, 2, 9, 40, 70, 3, True, True, True),
    "dq-only": (torch.float16, 1, 2, 1, 33, 64, 12, 1, True, False, True),
    "dprefix-only": (torch.bfloat16, 1, 2, 1, 33, 64, 12, 2, False, True, False),
    "five-tiles-two-blocks": (torch.float16, 2, 4, 1, 40, 64, 70, 2, True, True, True),
    "dq-only-two-chunks": (torch.bfloat16, 1, 2, 1, 33, 128, 40, 2, True, False, True),
    "dprefix-only-two-chunks": (torch.float16, 1, 2, 1, 33, 128, 40, 2, False, True, False),
}


@pytest.mark.parametrize("case", list(BACKWARD_CASES))
def test_emulated_backward_matches_torch(lib, case):
    dtype, b, hq, hkv, t, d, length, row_blocks, need_dq, need_dprefix, strided = BACKWARD_CASES[case]
    torch.manual_seed(1)
    q, dout = bshd(b, hq, t, d, dtype), bshd(b, hq, t, d, dtype)
    pk, pv = torch.randn(hkv, length, d).to(dtype), torch.randn(hkv, length, d).to(dtype)
    scale = d ** -0.5
    # A merged state from the forward with some main part, as the op's backward receives it.
    out, lse = TorchPrefixKernels().forward(q, pk, pv, bshd(b, hq, t, d, dtype), torch.randn(b, hq, t), scale)
    dq_main = bshd(b, hq, t, d, dtype) if strided else None
    dq, dpk, dpv = emulate_backward(lib, dout, q, pk, pv, out, lse, dq_main, scale, need_dq, need_dprefix,
                                    row_blocks)
    ref_dq, ref_dpk, ref_dpv = TorchPrefixKernels().backward(
        dout.float(), q.float(), pk.float(), pv.float(), out.float(), lse,
        None if dq_main is None else dq_main.float(), scale, need_dq, need_dprefix,
    )
    if need_dq:
        assert torch.isfinite(dq).all()
        torch.testing.assert_close(dq.float(), ref_dq, rtol=2e-2, atol=2e-2)
    else:
        assert dq is None
    if need_dprefix:
        assert torch.isfinite(dpk).all() and torch.isfinite(dpv).all()
        # Sums over B * G * T rows of products with P and dS rounded to the input dtype.
        torch.testing.assert_close(dpk.float(), ref_dpk, rtol=2e-2, atol=5e-2)
        torch.testing.assert_close(dpv.float(), ref_dpv, rtol=2e-2, atol=5e-2)
