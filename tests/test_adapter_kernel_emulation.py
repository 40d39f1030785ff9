"""The adapter GEMM kernels run on the CPU: csrc/adapter/{skinny,wide}_gemm.cuh compiled by g++ against the CUDA
stand-ins in tests/emulation/ (CTAs as threads, wmma and cp.async mocks that check their documented preconditions).

This checks, without a GPU, every output element of every kernel against float64 over shapes with partial tiles,
split K, unaligned rows and every activation (tests/emulation/adapter_gemm_emulation.cpp), and, under
ThreadSanitizer, the shared-memory synchronisation. It cannot check the real tensor cores, timing, or anything the
mocks do not model: tests/cuda/ does that on a GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATION = os.path.join(ROOT, "tests", "emulation")
SOURCE = os.path.join(EMULATION, "adapter_gemm_emulation.cpp")


def _cuda_include() -> str:
    """A CUDA toolkit include directory with the half-precision headers (cuda_fp16.h, cuda_bf16.h)."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "include", "cuda_bf16.h")):
            return os.path.join(home, "include")
    pytest.skip("needs the CUDA toolkit headers (set CUDA_HOME)")


def _compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("needs a C++20 compiler (g++)")
    return cxx


def _build(tmp_path, name, *flags) -> str:
    binary = str(tmp_path / name)
    command = [
        _compiler(), "-std=c++20", "-pthread", "-Wall", "-Wno-unknown-pragmas", *flags,
        # The stand-ins come first so that <mma.h> and <cuda_pipeline.h> resolve to them.
        f"-I{EMULATION}", f"-I{os.path.join(ROOT, 'csrc')}", f"-I{_cuda_include()}",
        SOURCE, "-o", binary,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"emulation build failed:\n{result.stderr[-4000:]}"
    return binary


def _run(binary, *args, timeout=600):
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    return result.returncode, output


def test_kernels_match_float64_on_the_cpu(tmp_path):
    """Copies land in shared memory only at the wait that covers them: reading a stage early reads stale data."""
    code, output = _run(_build(tmp_path, "emulation", "-O2"))
    assert code == 0, output[-6000:]
    assert "all cases passed" in output
    # 3 dtypes x (8 skinny shapes x 2 modes + 7 wide shapes x 2 layouts)
    assert sum(line.startswith("ok ") for line in output.splitlines()) == 90, "not every case ran"


def test_kernels_shared_memory_is_race_free_under_thread_sanitizer(tmp_path):
    """Copies land at once (-DEMU_EAGER_COPIES), so a copy into a stage other warps still read is a race TSan sees."""
    probe = subprocess.run([_compiler(), "-fsanitize=thread", "-x", "c++", "-", "-o", str(tmp_path / "probe")],
                           input="int main() { return 0; }", capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the compiler has no ThreadSanitizer runtime")
    binary = _build(tmp_path, "emulation_tsan", "-O1", "-g", "-fsanitize=thread", "-DEMU_EAGER_COPIES")
    code, output = _run(binary, "quick", timeout=900)
    assert "ThreadSanitizer" not in output, output[-6000:]
    assert code == 0, output[-6000:]
    assert "all cases passed" in output
