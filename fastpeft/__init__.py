"""fastpeft: fused parameter-efficient fine-tuning layers (adapters, LoRA, prefix tuning) for transformers."""

from fastpeft._extension import (
    disable_kernels,
    extension_loaded,
    kernels_enabled,
    set_kernels_enabled,
)
from fastpeft._notice import FastPeftFallbackWarning
from fastpeft._version import __version__
from fastpeft.ops import adapter, prefix_attention

__all__ = [
    "__version__",
    "adapter",
    "prefix_attention",
    "disable_kernels",
    "extension_loaded",
    "kernels_enabled",
    "set_kernels_enabled",
    "FastPeftFallbackWarning",
]
