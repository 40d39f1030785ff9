"""The model-level API: apply a method to a transformers model, inspect it, merge or eject, remove it."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastpeft.config import PrefixConfig, as_unified
from fastpeft.modules.lora import LoRALinear
from fastpeft.patching import PREFIX_ATTR, build_plan, execute, get_state, host_copy, undo


def apply(model: nn.Module, config) -> nn.Module:
    """Insert the method(s) of `config` into `model` in place, freeze the base model, and return `model`.

    `config` is a preset name ("houlsby", "pfeiffer", "parallel", "scaled_parallel", "lora", "prefix", "mam"),
    a `UnifiedConfig`, or one `AdapterConfig` / `LoRAConfig` / `PrefixConfig`. Afterwards exactly the method's
    parameters require grad, plus the task head (`train_head`) and the norms (`train_layernorm`).

    Raises (leaving the model unchanged) if the architecture is not supported, the model is already patched, or
    the config does not fit the model.
    """
    unified = as_unified(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpeft.apply: 'model' must be a transformers model (nn.Module), got {type(model).__name__}")
    plan = build_plan(model, unified)
    execute(model, plan)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply` (and `merge_lora`, `eject_prefix`): the original modules, weights and requires_grad flags."""
    undo(model, get_state(model, "remove"))
    return model


def is_patched(model: nn.Module) -> bool:
    try:
        get_state(model, "is_patched")
    except ValueError:
        return False
    return True


def get_patch_config(model: nn.Module):
    """The `UnifiedConfig` the model is patched with (after `eject_prefix`, with `reparam_dim=None`)."""
    return get_state(model, "get_patch_config").config


def trainable_parameters(model: nn.Module) -> tuple:
    """(trainable, total) parameter counts; shared parameters count once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each shared parameter once
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print trainable and total parameter counts and the trainable percentage."""
    trainable, total = trainable_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight (W + alpha/r * B A) and drop the LoRA modules.

    For inference: the model then runs at the base model's cost. The original weights are kept on the CPU so that
    `fastpeft.remove` can still restore the model exactly.
    """
    state = get_state(model, "merge_lora")
    wrappers = [(path, model.get_submodule(path)) for path in state.lora_paths]
    wrappers = [(path, m) for path, m in wrappers if isinstance(m, LoRALinear)]
    if not wrappers:
        raise ValueError("fastpeft.merge_lora: the model has no (unmerged) LoRA modules")
    removed = set()
    for path, wrapper in wrappers:
        base = wrapper.base_layer
        merged = wrapper.merged_weight()
        state.merged[path] = host_copy(base.weight)
        with torch.no_grad():
            base.weight.copy_(merged)
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, base)
        removed |= {f"{path}.{n}" for n, _ in wrapper.named_parameters() if not n.startswith("base_layer.")}
    state.trained = [n for n in state.trained if n not in removed]
    return model


def eject_prefix(model: nn.Module) -> nn.Module:
    """Replace the prefix reparametrization MLP by the prefixes it computes (a plain trainable parameter).

    Outputs do not change; the config the model reports (and `save_adapter` writes) becomes
    `PrefixConfig(..., reparam_dim=None)` (and the other reparametrization fields unset).
    """
    state = get_state(model, "eject_prefix")
    encoder = getattr(model, PREFIX_ATTR, None)
    if encoder is None:
        raise ValueError("fastpeft.eject_prefix: the model has no prefix")
    if encoder.flat:
        raise ValueError("fastpeft.eject_prefix: the prefix is already a plain parameter")
    old = {f"{PREFIX_ATTR}.{n}" for n, _ in encoder.named_parameters()}
    encoder.eject()
    new = [f"{PREFIX_ATTR}.{n}" for n, p in encoder.named_parameters() if p.requires_grad]
    state.trained = [n for n in state.trained if n not in old] + new
    attn = state.config.attn
    if isinstance(attn, PrefixConfig):
        flat = dataclasses.replace(attn, reparam_dim=None, embedding_dim=None, reparam_per_kind=False)
        state.config = dataclasses.replace(state.config, attn=flat)
    return model
