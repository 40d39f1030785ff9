"""What converting from peft and from AdapterHub `adapters` have in common.

- `rebuild`: a plain transformers model of the source's original class that shares the source's base weights.
- `locate`: where a module path of the source lies in fastpeft's terms (global layer index, path in the layer).
- `lora_config`: the fastpeft LoRA configs that adapt exactly the projections the source adapts, checked against
  fastpeft's own plan.
- `apply_with_weights`: patch a model and fill the inserted parameters; on any error the model is restored.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from fastpeft.architectures import Arch
from fastpeft.config import ATTN_ROLES, ROLES, LoRAConfig, UnifiedConfig
from fastpeft.patching import STATE_ATTR, build_plan, execute, undo


class ConversionError(ValueError):
    """The source's adapter cannot be reproduced exactly by fastpeft; the message names the flag or module."""


# ----------------------------------------------------------------------------------------------------------------
# The base model
# ----------------------------------------------------------------------------------------------------------------


def transformers_class(module: nn.Module) -> type:
    """The transformers class a module was created as (AdapterHub swaps classes for subclasses of it)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls
    raise ConversionError(f"{type(module).__name__} is not a transformers model")


def rebuild(source: nn.Module, cls: type, tensor_for: Callable[[str], Optional[torch.Tensor]], where: str) -> nn.Module:
    """A model of class `cls` with `source`'s config whose parameters and buffers are the source's own tensors
    (`tensor_for(name)`): nothing is copied, and training either model updates the weights of both.

    Parameters are new `nn.Parameter` objects over the same storage (one per source parameter, so tied weights stay
    tied), so that freezing or training the converted model does not change the source's requires_grad flags or
    gradients. The model is built on the meta device, so building it allocates nothing.
    """
    config = copy.deepcopy(source.config)
    if hasattr(config, "adapters"):  # AdapterHub's bookkeeping, not part of the transformers config
        del config.adapters
    with torch.device("meta"):
        model = cls(config)
    shared = {}  # id of a source parameter -> its counterpart here
    for kind, named in (("parameter", model.named_parameters), ("buffer", model.named_buffers)):
        for name, _ in list(named(remove_duplicate=False)):
            tensor = tensor_for(name)
            if tensor is None:
                raise ConversionError(f"{where}: the source model has no {kind} for {type(model).__name__}.{name}")
            parent, _, leaf = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            if kind == "parameter":
                if id(tensor) not in shared:
                    shared[id(tensor)] = nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
                owner._parameters[leaf] = shared[id(tensor)]
            else:
                owner._buffers[leaf] = tensor
    if getattr(source, "generation_config", None) is not None and hasattr(model, "generation_config"):
        model.generation_config = copy.deepcopy(source.generation_config)
    model.train(source.training)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Where a module sits
# ----------------------------------------------------------------------------------------------------------------


def locate(arch: Arch, model: nn.Module, path: str) -> Optional[tuple]:
    """(global layer index, path inside the layer) of module path `path`, whatever the model's prefix
    ("base_model.model.model.layers.3.mlp" -> (3, "mlp")); None outside the layers."""
    offset = 0
    base = model.base_model
    for stack in arch.stacks:
        count = len(base.get_submodule(stack.layers))
        match = re.search(rf"(?:^|\.){re.escape(stack.layers)}\.(\d+)\.(.+)$", path)
        if match and int(match.group(1)) < count:
            return offset + int(match.group(1)), match.group(2)
        offset += count
    return None


def stack_of(arch: Arch, model: nn.Module, index: int):
    """The stack holding global layer `index`."""
    base = model.base_model
    for stack in arch.stacks:
        count = len(base.get_submodule(stack.layers))
        if index < count:
            return stack
        index -= count
    raise IndexError(index)


# ----------------------------------------------------------------------------------------------------------------
# LoRA: which projections
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAUnit:
    """One low-rank update of the source: on the projection at `path` (global layer `layer`, path `rel` inside it),
    on its whole output (`role` None) or on one slice of a fused projection (`role` "q", "k" or "v")."""

    layer: int
    rel: str
    role: Optional[str]


def _roles_of(arch: Arch, model: nn.Module, layer: int, rel: str, role: Optional[str]) -> list:
    """[(site, fastpeft role, attention kind "self" / "cross" / None)] that a source update covers."""
    stack = stack_of(arch, model, layer)
    found = []
    attentions = [("self", stack.self_attention)]
    if stack.cross_attention is not None:
        attentions.append(("cross", stack.cross_attention))
    for kind, attention in attentions:
        for name in ATTN_ROLES:
            for proj in getattr(attention, name):
                if proj.path == rel and (role is None or role == name):
                    found.append(("attn", name, kind))
    for name in ("ffn_in", "ffn_out"):
        if any(proj.path == rel for proj in getattr(stack, name)):
            found.append(("ffn", name, None))
    return found


def lora_config(arch: Arch, model: nn.Module, units: dict, where: str) -> tuple:
    """fastpeft LoRA configs (attn, ffn; either may be None) that adapt exactly the source's `units`.

    `units` maps each `LoRAUnit` to its settings (r, alpha, rslora, dropout). The configs are proposed from where the
    units sit, then planned on `model` (which is not modified) and the planned projections compared with the units:
    anything fastpeft would adapt differently raises `ConversionError` naming the projections.
    """
    covered = {}  # unit -> [(site, role, kind)]
    for unit in units:
        covered[unit] = _roles_of(arch, model, unit.layer, unit.rel, unit.role)
        if not covered[unit]:
            raise ConversionError(
                f"{where}: LoRA on {unit.rel!r} (layer {unit.layer}) has no fastpeft role (fastpeft adapts the "
                "attention projections q, k, v, o and the FFN projections)"
            )
    configs = {}
    for site in ("attn", "ffn"):
        mine = {unit: roles for unit, roles in covered.items() if roles[0][0] == site}
        if not mine:
            configs[site] = None
            continue
        settings = {units[unit] for unit in mine}
        if len(settings) > 1:
            described = ", ".join(f"r={s[0]} alpha={s[1]} rslora={s[2]} dropout={s[3]}" for s in sorted(settings))
            raise ConversionError(
                f"{where}: the {site} projections use different LoRA settings ({described}); fastpeft uses one "
                "rank, alpha and dropout per site"
            )
        (r, alpha, rslora, dropout), = settings
        configs[site] = LoRAConfig(
            r=r,
            alpha=alpha,
            rslora=rslora,
            dropout=dropout,
            targets=tuple(sorted({role for roles in mine.values() for _, role, _ in roles}, key=ROLES.index)),
            layers=tuple(sorted({unit.layer for unit in mine})),
            cross_attention=any(kind == "cross" for roles in mine.values() for _, _, kind in roles),
            # One update on a whole fused projection (peft on GPT-2's c_attn) covers several roles.
            fuse_slices=any(unit.role is None and len(roles) > 1 for unit, roles in mine.items()),
        )
    config = UnifiedConfig(attn=configs["attn"], ffn=configs["ffn"])
    planned = planned_units(arch, model, config)
    if set(planned) != set(units):
        missing = sorted(_describe(u) for u in set(units) - set(planned))
        extra = sorted(_describe(u) for u in set(planned) - set(units))
        detail = "; ".join(
            f"{title}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
            for title, items in (("adapted by the source only", missing), ("fastpeft would also adapt", extra))
            if items
        )
        raise ConversionError(
            f"{where}: fastpeft cannot adapt exactly the projections the source adapts (it applies the same roles "
            f"to every selected layer, and a role to all of its projections): {detail}"
        )
    return configs["attn"], configs["ffn"]


def _describe(unit: LoRAUnit) -> str:
    return f"layer {unit.layer} {unit.rel}" + (f" [{unit.role}]" if unit.role else "")


def planned_units(arch: Arch, model: nn.Module, config: UnifiedConfig) -> dict:
    """{LoRAUnit: (fastpeft module path, fastpeft role)} that fastpeft would create for `config` on `model`."""
    out = {}
    for item in build_plan(model, config).lora:
        layer, rel = locate(arch, model, item.path)
        for role, part in item.parts.items():
            out[LoRAUnit(layer, rel, None if part is None else role)] = (item.path, role)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Patching and filling
# ----------------------------------------------------------------------------------------------------------------


class Writer:
    """Writes source values into a patched model's parameters by name, and remembers which it wrote.

    Inserted parameters take the source's floating dtype (peft keeps LoRA weights in float32 under a bfloat16 model;
    fastpeft computes with them in the activations' dtype), so that no value is rounded on the way.
    """

    def __init__(self, model: nn.Module, where: str, inserted: frozenset = frozenset()):
        self.params = dict(model.named_parameters())
        self.where = where
        self.inserted = inserted
        self.written = set()

    def __call__(self, name: str, value: torch.Tensor, what: Optional[str] = None) -> None:
        param = self.params.get(name)
        if param is None:
            raise ConversionError(f"{self.where}: the converted model has no parameter {name!r} for {what or name}")
        shape, source = tuple(param.shape), tuple(value.shape)
        if shape != source:
            # AdapterHub keeps a learned scale as a [1] tensor, fastpeft as a 0-d one.
            if value.numel() == param.numel() == 1:
                value = value.reshape(shape)
            else:
                raise ConversionError(
                    f"{self.where}: {what or name} has shape {list(source)} in the source, fastpeft expects {list(shape)}"
                )
        if name in self.inserted and value.dtype.is_floating_point and value.dtype != param.dtype:
            param.data = param.data.to(value.dtype)
        param.copy_(value.to(device=param.device, dtype=param.dtype))
        self.written.add(name)


def apply_with_weights(model: nn.Module, config: UnifiedConfig, fill: Callable[[Writer], None], where: str) -> nn.Module:
    """Patch `model` with `config`, then `fill` the inserted (and head) parameters through a `Writer`; every inserted
    parameter must be written. On any error the model is left as it was."""
    if getattr(model, STATE_ATTR, None) is not None:
        raise ConversionError(f"{where}: the model is already patched by fastpeft; call fastpeft.remove(model) first")
    before = {id(p) for p in model.parameters()}
    state = execute(model, build_plan(model, config))
    try:
        inserted = frozenset(n for n, p in model.named_parameters() if id(p) not in before)
        writer = Writer(model, where, inserted)
        with torch.no_grad():
            fill(writer)
        missing = sorted(inserted - writer.written)
        if missing:
            raise ConversionError(f"{where}: the source has no values for {', '.join(missing[:5])}")
    except BaseException:
        undo(model, state)
        raise
    return model
