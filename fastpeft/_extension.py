"""Loading the optional compiled extension, and the switch that decides whether its kernels are used.

The package works without the extension: every op falls back to `fastpeft.reference`. The extension registers
its kernels as `torch.ops.fastpeft_cuda.*` when `fastpeft._C` is imported. It is loaded only into the torch
major.minor (and CUDA major) it was built for, and its kernels run only on GPUs it has code for; otherwise a
`FastPeftFallbackWarning` says why, naming what it was built for, and the ops run the reference path.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from fastpeft import _compat
from fastpeft._notice import FastPeftFallbackWarning, notice_once

_BUILD_INFO_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
_CONSEQUENCE = "Every fastpeft op runs the PyTorch reference path (correct, slower)."
_REMEDY = (
    "To use the kernels, install the fastpeft wheel built for this torch, or build fastpeft from source against "
    "it (pip install --no-build-isolation <fastpeft source or sdist>; README, Install)."
)


def read_build_info_file(path: str) -> Optional[dict]:
    """How the extension beside this file was built (written by setup.py), or None when there is no file."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def load_extension(
    import_module: Callable[[str], object], built: Optional[dict], torch_version: str, torch_cuda: Optional[str]
) -> Tuple[Optional[object], Optional[str], bool]:
    """Load fastpeft._C if it fits the running torch: (module or None, why not, whether to warn).

    `built` is the extension's build info (None when there is none: not built, or built before it was recorded).
    An extension built for another torch is not even loaded: its symbols may resolve and crash later. A pure-Python
    install (no extension) is no reason to warn; an extension that is there but cannot be used is.
    """
    if built is not None:
        problem = _compat.torch_problem(built, torch_version, torch_cuda)
        if problem:
            return None, f"{problem}, so it is not loaded. {_CONSEQUENCE} {_REMEDY}", True
    try:
        return import_module("fastpeft._C"), None, False
    except ImportError as error:
        if built is None and isinstance(error, ModuleNotFoundError) and error.name == "fastpeft._C":
            return None, "fastpeft._C is not installed (a pure-Python build: reference path only)", False
        built_for = f" (built for torch {built['torch_version']}, CUDA {built['torch_cuda_version']})" if built else ""
        hint = ""
        if "undefined symbol" in str(error):
            hint = " An undefined symbol means another torch than the one it was built for."
        running = f"torch {torch_version} (CUDA {torch_cuda or 'none'})"
        message = f"the CUDA extension fastpeft._C{built_for} failed to load into {running}: {error}.{hint}"
        return None, f"{message} {_CONSEQUENCE} {_REMEDY}", True


_C, LOAD_ERROR, _warn = load_extension(
    importlib.import_module, read_build_info_file(_BUILD_INFO_PATH), torch.__version__, torch.version.cuda
)
if _warn:
    warnings.warn(f"fastpeft: {LOAD_ERROR}", FastPeftFallbackWarning, stacklevel=2)
del _warn

# Kernels need bf16 tensor cores and cp.async: Ampere (sm_80) or newer.
MIN_COMPUTE_CAPABILITY = (8, 0)

_enabled = os.environ.get("FASTPEFT_DISABLE_KERNELS", "0").lower() not in ("1", "true", "yes")


def extension_loaded() -> bool:
    """True when the compiled extension `fastpeft._C` was built and imported."""
    return _C is not None


def build_info() -> Optional[dict]:
    """How the loaded extension was built (versions, architectures, commit), or None without the extension."""
    return dict(_C.build_info()) if _C is not None else None


def kernels_enabled() -> bool:
    """The user-facing switch (FASTPEFT_DISABLE_KERNELS=1 or `set_kernels_enabled(False)` turns kernels off)."""
    return _enabled


def set_kernels_enabled(enabled: bool) -> None:
    """Use (True) or bypass (False) the CUDA kernels; bypassing runs the reference path on every device."""
    global _enabled
    _enabled = bool(enabled)


@contextlib.contextmanager
def disable_kernels() -> Iterator[None]:
    """Run the enclosed code on the reference path (for comparisons and debugging)."""
    previous = _enabled
    set_kernels_enabled(False)
    try:
        yield
    finally:
        set_kernels_enabled(previous)


def kernels_usable(device: torch.device) -> bool:
    """Whether the CUDA kernels can run on `device` right now."""
    if not (_enabled and _C is not None and device.type == "cuda"):
        return False
    if torch.cuda.get_device_capability(device) < MIN_COMPUTE_CAPABILITY:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    problem = device_problem(index)
    if problem:
        notice_once(f"no-kernel-image-{index}", f"fastpeft: GPU {index}: {problem}; ops on it run the reference path")
    return problem is None


_device_problems: Dict[int, Optional[str]] = {}


def device_problem(index: int) -> Optional[str]:
    """Why the loaded extension has no code for GPU `index` (None when it has), asked once per GPU: first from the
    architectures it was built for, then of the CUDA runtime (which also catches PTX too new for the driver)."""
    if index not in _device_problems:
        capability = torch.cuda.get_device_capability(index)
        arch_list = _C.build_info()["arch_list"]
        problem = _compat.arch_problem(capability, arch_list)
        if problem is None:
            probe = _C.kernel_image(index)
            if not probe["ok"]:
                problem = (
                    f"the CUDA runtime finds no usable kernel image in the extension (built for "
                    f"TORCH_CUDA_ARCH_LIST={arch_list!r}) for this GPU (sm_{capability[0]}{capability[1]}): "
                    f"{probe['error']}: {probe['message']}"
                )
        _device_problems[index] = problem
    return _device_problems[index]
