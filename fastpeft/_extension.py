"""Loading the optional compiled extension, and the switch that decides whether its kernels are used.

The package works without the extension: every op falls back to `fastpeft.reference`. The extension registers
its kernels as `torch.ops.fastpeft_cuda.*` when `fastpeft._C` is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Iterator, Optional

import torch

try:
    _C = importlib.import_module("fastpeft._C")  # importing registers torch.ops.fastpeft_cuda.*

    LOAD_ERROR: Optional[str] = None
except ImportError as error:  # not built (pure-Python install), or built against another torch
    _C = None
    LOAD_ERROR = str(error)

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
    return torch.cuda.get_device_capability(device) >= MIN_COMPUTE_CAPABILITY
