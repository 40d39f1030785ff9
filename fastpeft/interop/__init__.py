"""Drop-in conversion: run a model set up with Hugging Face peft or AdapterHub `adapters` on fastpeft.

- `from_peft(peft_model)` / `load_peft_checkpoint(base_model, directory)`: LoRA and prefix tuning.
- `from_adapters(model)` / `load_adapters_checkpoint(base_model, directory)`: bottleneck adapters (seq_bn,
  double_seq_bn, par_bn, scaled_par_bn), prefix tuning (with or without its MLP), LoRA, and unions of them (mam).

Every flag of the source that changes the math is reproduced exactly or refused with `ConversionError` naming the
flag and its value; the converted model gives the source's outputs and gradients.
"""

from fastpeft.interop._common import ConversionError
from fastpeft.interop.adapters import from_adapters, load_adapters_checkpoint
from fastpeft.interop.peft import from_peft, load_peft_checkpoint

__all__ = ["ConversionError", "from_peft", "load_peft_checkpoint", "from_adapters", "load_adapters_checkpoint"]
