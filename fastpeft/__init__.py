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
from fastpeft.config import (
    PRESETS,
    AdapterConfig,
    LoRAConfig,
    PrefixConfig,
    UnifiedConfig,
    get_config,
)
from fastpeft.architectures import SUPPORTED_MODEL_TYPES
from fastpeft.model_api import (
    apply,
    eject_prefix,
    get_patch_config,
    is_patched,
    merge_lora,
    print_trainable_parameters,
    remove,
    trainable_parameters,
)
from fastpeft.serialization import load_adapter, save_adapter
from fastpeft.interop import (
    ConversionError,
    from_adapters,
    from_peft,
    load_adapters_checkpoint,
    load_peft_checkpoint,
)

__all__ = [
    "__version__",
    "adapter",
    "prefix_attention",
    "disable_kernels",
    "extension_loaded",
    "kernels_enabled",
    "set_kernels_enabled",
    "FastPeftFallbackWarning",
    # The Python layer: configs, presets and the model API.
    "AdapterConfig",
    "LoRAConfig",
    "PrefixConfig",
    "UnifiedConfig",
    "PRESETS",
    "get_config",
    "SUPPORTED_MODEL_TYPES",
    "apply",
    "remove",
    "is_patched",
    "get_patch_config",
    "trainable_parameters",
    "print_trainable_parameters",
    "save_adapter",
    "load_adapter",
    "merge_lora",
    "eject_prefix",
    # Drop-in conversion from peft and AdapterHub adapters.
    "from_peft",
    "load_peft_checkpoint",
    "from_adapters",
    "load_adapters_checkpoint",
    "ConversionError",
]
