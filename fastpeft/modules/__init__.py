"""The modules fastpeft inserts into a model: bottleneck adapters, LoRA wrappers and the prefix encoder."""

from fastpeft.modules.adapter import AdapterLayer, BottleneckAdapter
from fastpeft.modules.lora import LoRALinear
from fastpeft.modules.prefix import PrefixEncoder, PrefixSite

__all__ = ["AdapterLayer", "BottleneckAdapter", "LoRALinear", "PrefixEncoder", "PrefixSite"]
