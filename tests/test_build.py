"""The build tells the truth: the extension is there when it should be, and `python -m fastpeft.info` says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastpeft
from fastpeft import _extension, info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_built_when_expected():
    """`make test` sets FASTPEFT_EXPECT_EXTENSION=1 when a CUDA toolkit is present: then the build must have run."""
    if os.environ.get("FASTPEFT_EXPECT_EXTENSION") != "1":
        pytest.skip("FASTPEFT_EXPECT_EXTENSION is not 1 (no CUDA toolkit, or not run through make test)")
    assert fastpeft.extension_loaded(), f"fastpeft._C did not load: {_extension.LOAD_ERROR}"
    build = _extension.build_info()
    assert build["torch_version"] == torch.__version__
    assert build["version"] == fastpeft.__version__
    assert build["arch_list"], "no architectures recorded"
    # The kernel is registered with the dispatcher, for CUDA tensors.
    schema = str(torch.ops.fastpeft_cuda.adapter_epilogue.default._schema)
    assert schema.startswith("fastpeft_cuda::adapter_epilogue(Tensor residual, Tensor up")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastpeft_cuda::adapter_epilogue", "CUDA")


def test_info_matches_the_running_state():
    report = info.collect()
    assert report["fastpeft_version"] == fastpeft.__version__
    assert report["torch_version"] == torch.__version__
    assert report["extension_built"] == fastpeft.extension_loaded()
    if not torch.cuda.is_available():
        assert report["gpu"] is None
        assert report["kernels_available"] is False
        assert report["kernels_unavailable_reason"]
    with fastpeft.disable_kernels():
        disabled = info.collect()
    assert disabled["kernels_available"] is False and "disabled" in disabled["kernels_unavailable_reason"]


def test_info_command_runs():
    result = subprocess.run([sys.executable, "-m", "fastpeft.info"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"fastpeft {fastpeft.__version__}")
    assert "CUDA kernels available now:" in result.stdout
    as_json = subprocess.run([sys.executable, "-m", "fastpeft.info", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert '"fastpeft_version"' in as_json.stdout


def test_kernel_switch():
    assert fastpeft.kernels_enabled()
    with fastpeft.disable_kernels():
        assert not fastpeft.kernels_enabled()
        assert not _extension.kernels_usable(torch.device("cuda", 0))
    assert fastpeft.kernels_enabled()
    assert not _extension.kernels_usable(torch.device("cpu"))


def _setup_py(env_overrides, *args):
    env = dict(os.environ, **env_overrides)
    return subprocess.run([sys.executable, "setup.py", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def test_setup_pure_python_when_asked():
    result = _setup_py({"FASTPEFT_BUILD_CUDA": "0"}, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == fastpeft.__version__
    assert "installing the pure-Python package without CUDA kernels (FASTPEFT_BUILD_CUDA=0)" in result.stderr


def test_setup_fails_loudly_when_cuda_is_required_but_missing():
    result = _setup_py({"FASTPEFT_BUILD_CUDA": "1", "CUDA_HOME": "/nonexistent-cuda"}, "--version")
    if torch.version.cuda is None:
        assert "has no CUDA support" in result.stderr
    assert result.returncode != 0
    assert "FASTPEFT_BUILD_CUDA=1 but the CUDA extension cannot be built" in result.stderr


def test_setup_rejects_bad_setting():
    result = _setup_py({"FASTPEFT_BUILD_CUDA": "yes"}, "--version")
    assert result.returncode != 0 and "must be 0, 1 or unset" in result.stderr
