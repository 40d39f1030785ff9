"""End-to-end providers: one function per library that turns a freshly built model into a model with `method`.

Providers: `fastpeft` (kernels on), `fastpeft_ref` (the same model with `fastpeft.disable_kernels()` around the
measurement), `adapters` (AdapterHub, the matching config), `peft` (LoRA and prefix tuning only), `full` (full
fine-tuning, the yardstick; method "full"). A provider that cannot run here raises `Unavailable` with the reason.

Every method's sizes come from one place, `method_spec`: fastpeft's preset of the same name (what
`fastpeft.apply(model, name)` builds), given to each library in its own terms. Zero-initialised trainable weights
(LoRA's B, the parallel adapter's up-projection) are re-drawn from a small normal after setup, the same way for every
provider: timing a product with zeros measures nothing a user trains with.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

PROVIDERS = ("fastpeft", "fastpeft_ref", "adapters", "peft", "full")
# fastpeft's activation names in AdapterHub's vocabulary.
ADAPTERS_ACTIVATIONS = {"silu": "swish", "gelu_tanh": "gelu_new", "identity": "linear"}


class Unavailable(Exception):
    """This provider cannot run this method here; the message says why."""


@dataclass(frozen=True)
class MethodSpec:
    r: int = 0  # bottleneck (adapters) or rank (LoRA)
    activation: str = "relu"
    scale: object = 1.0  # s of the scaled add (a float, or "learned"); LoRA: alpha / r
    prefix: int = 0  # prefix length l
    reparam: int = 0  # width of the prefix reparametrization MLP
    train_layernorm: bool = False  # the norms are trained too (Houlsby)
    original_ln_before: bool = False  # sequential adapters on post-LN models read LN(h + x) (AdapterHub's seq_bn)
    targets: tuple = ()  # LoRA: the projections by role (q, k, v, o, ffn_in, ffn_out)


METHODS = ("houlsby", "pfeiffer", "parallel", "scaled_parallel", "lora", "prefix", "mam", "full")


def method_spec(method: str) -> MethodSpec:
    """The sizes of `method`, read from fastpeft's preset of that name (the papers' defaults, PAPER.md sections 2
    and 4), so that every library gets exactly what `fastpeft.apply(model, method)` builds."""
    import fastpeft

    if method == "full":
        return MethodSpec()
    config = fastpeft.get_config(method)
    values = {"train_layernorm": bool(getattr(config, "train_layernorm", False))}
    for part in (config.attn, config.ffn):
        kind = type(part).__name__
        if kind == "AdapterConfig":
            values.update(r=part.r, activation=part.activation, scale=part.scale,
                          original_ln_before=bool(getattr(part, "original_ln_before", False)))
        elif kind == "LoRAConfig":
            values.update(r=part.r, scale=part.alpha / part.r, targets=tuple(part.targets))
        elif kind == "PrefixConfig":
            values.update(prefix=part.length, reparam=part.reparam_dim or 0)
    return MethodSpec(**values)


def providers_for(method: str) -> tuple[str, ...]:
    """fastpeft and its reference path have every method, AdapterHub too, peft only LoRA and prefix tuning."""
    if method == "full":
        return ("full",)
    return ("fastpeft", "fastpeft_ref", "adapters") + (("peft",) if method in ("lora", "prefix") else ())


def prepare(model, model_name: str, method: str, provider: str):
    """Apply `method` with `provider` to `model` in place; returns the model to run (peft wraps it)."""
    if provider == "full":
        return model
    if provider in ("fastpeft", "fastpeft_ref"):
        model = _fastpeft(model, method)
    elif provider == "adapters":
        model = _adapters(model, model_name, method)
    elif provider == "peft":
        model = _peft(model, model_name, method)
    else:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and not param.any():
                param.normal_(0.0, 0.02)
    return model


def run_context(provider: str):
    """The context every step of `provider` runs in (the reference path for fastpeft_ref)."""
    if provider == "fastpeft_ref":
        import fastpeft

        return fastpeft.disable_kernels()
    return contextlib.nullcontext()


def _fastpeft(model, method):
    import fastpeft

    return fastpeft.apply(model, method)


def _adapters(model, model_name, method):
    try:
        import adapters
    except Exception as error:  # noqa: BLE001 - any import failure means the library is unusable here
        raise Unavailable(f"adapters cannot be imported here ({type(error).__name__}: {error})") from None
    from adapters import (
        DoubleSeqBnConfig,
        LoRAConfig,
        MAMConfig,
        ParBnConfig,
        PrefixTuningConfig,
        SeqBnConfig,
    )

    spec = method_spec(method)
    d = model.config.hidden_size
    activation = ADAPTERS_ACTIVATIONS.get(spec.activation, spec.activation)
    bottleneck = dict(reduction_factor=d / spec.r, non_linearity=activation) if spec.r else {}
    if method == "houlsby":
        config = DoubleSeqBnConfig(**bottleneck, original_ln_before=spec.original_ln_before)
    elif method == "pfeiffer":
        config = SeqBnConfig(**bottleneck, original_ln_before=spec.original_ln_before)
    elif method in ("parallel", "scaled_parallel"):
        config = ParBnConfig(**bottleneck, scaling=spec.scale)
    elif method == "lora":
        _attention_roles(spec)
        config = LoRAConfig(r=spec.r, alpha=int(spec.r * spec.scale), attn_matrices=list(spec.targets))
    elif method == "prefix":
        config = PrefixTuningConfig(prefix_length=spec.prefix, bottleneck_size=spec.reparam)
    elif method == "mam":
        config = MAMConfig(
            PrefixTuningConfig(prefix_length=spec.prefix, bottleneck_size=spec.reparam),
            ParBnConfig(**bottleneck, scaling=spec.scale),
        )
    else:
        raise Unavailable(f"no adapters config for method {method!r}")
    # add_adapter logs "adapters available but none are activated" while it sets the new one active: silence it.
    quiet = logging.getLogger("adapters.model_mixin")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        adapters.init(model)
        model.add_adapter("bench", config=config, set_active=True)
        model.train_adapter("bench")
    finally:
        quiet.setLevel(level)
    if spec.train_layernorm:  # as fastpeft's preset does (Houlsby trained the LayerNorms)
        for module in model.modules():
            name = type(module).__name__
            if isinstance(module, torch.nn.LayerNorm) or name.endswith(("LayerNorm", "RMSNorm")):
                module.requires_grad_(True)
    return model


def _peft(model, model_name, method):
    import peft

    spec = method_spec(method)
    task = {"roberta-base": "SEQ_CLS", "bart-large": "SEQ_2_SEQ_LM", "llama-1b": "CAUSAL_LM"}[model_name]
    if method == "lora":
        names = PEFT_LORA_NAMES["roberta" if model_name == "roberta-base" else "bart-llama"]
        targets = [names[role] for role in _attention_roles(spec)]
        config = peft.LoraConfig(task_type=task, r=spec.r, lora_alpha=int(spec.r * spec.scale),
                                 lora_dropout=0.0, target_modules=targets)
    elif method == "prefix":
        config = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=spec.prefix, prefix_projection=True,
                                         encoder_hidden_size=spec.reparam)
    else:
        raise Unavailable(f"peft has no {method!r} (it has LoRA and prefix tuning, no bottleneck adapters)")
    return peft.get_peft_model(model, config)


# The module names of the q, k, v projections, for peft's target_modules.
PEFT_LORA_NAMES = {
    "roberta": {"q": "query", "k": "key", "v": "value"},
    "bart-llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj"},
}


def _attention_roles(spec: MethodSpec) -> tuple:
    """LoRA's targets, which must be among q, k, v: what AdapterHub (`attn_matrices`) and peft both express."""
    if not spec.targets or not set(spec.targets) <= {"q", "k", "v"}:
        raise Unavailable(f"LoRA targets {spec.targets}: only q, k and v map onto AdapterHub and peft here")
    return spec.targets


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
