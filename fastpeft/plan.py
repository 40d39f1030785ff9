"""Planning the insertion of methods into a model.

`build_plan` checks everything against the model and the architecture table (`fastpeft.architectures`) and lists
what `fastpeft.patching.execute` will do, without touching the model: a config that does not fit raises here, and
the model stays as it was.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from fastpeft.architectures import Arch, find_arch
from fastpeft.config import AdapterConfig, LoRAConfig, PrefixConfig, UnifiedConfig
from fastpeft.modules.adapter import AdapterLayer
from fastpeft.modules.lora import LoRALinear, linear_features
from fastpeft.modules.prefix import PrefixEncoder, default_scaling

STATE_ATTR = "_fastpeft"
PREFIX_IMPLEMENTATIONS = ("eager", "sdpa")
_FASTPEFT_MODULES = (AdapterLayer, LoRALinear, PrefixEncoder)


@dataclass
class LoRAPlan:
    path: str
    parts: dict  # role -> None | (index, count)
    config: LoRAConfig


@dataclass
class AdapterPlan:
    path: str  # the output projection
    x_from: Optional[str]  # the module receiving what the adapter reads (sublayer input or residual stream)
    x_arg: tuple
    features: int
    config: AdapterConfig
    post_norm: Optional[str] = None  # the block's LayerNorm (original_ln_before)


@dataclass
class PrefixSitePlan:
    path: str
    kv_heads: int
    head_dim: int
    scaling: float
    legacy: bool
    kind: str  # "encoder" / "decoder" (self-attention of that stack) or "cross"


@dataclass
class Plan:
    arch: Arch
    config: UnifiedConfig
    hidden_size: int
    lora: list = field(default_factory=list)
    adapters: list = field(default_factory=list)
    prefix_sites: list = field(default_factory=list)
    prefix_config: Optional[PrefixConfig] = None
    entries: list = field(default_factory=list)  # model entry points (paths) for the prefix
    embeddings: list = field(default_factory=list)
    probe: str = ""  # first layer: its gradient_checkpointing flag
    positions: Optional[str] = None  # the module the token positions enter (PrefixConfig.shift_positions)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _module(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(
            f"fastpeft.apply: {type(model).__name__} has no module {path!r} ({what}); this model class does not "
            "have the layout fastpeft expects for its architecture"
        ) from None


def _base_path(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    for name, module in model.named_modules():
        if module is base:
            return name
    return ""


def _uses_attention_interface(module: nn.Module) -> bool:
    """Whether the attention module's code looks its attention function up in transformers' interface."""
    source = sys.modules.get(type(module).__module__)
    return source is not None and "ALL_ATTENTION_FUNCTIONS" in vars(source)


def _selected(config, index: int) -> bool:
    return config.layers is None or index in config.layers


def head_geometry(config, stack) -> tuple:
    """(query heads, key/value heads, head size) of a stack."""
    heads = getattr(config, stack.heads)
    kv_heads = getattr(config, stack.kv_heads, None) if stack.kv_heads else None
    kv_heads = kv_heads or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def find_fastpeft_modules(model: nn.Module) -> list:
    return [name for name, m in model.named_modules() if isinstance(m, _FASTPEFT_MODULES)]


def build_plan(model: nn.Module, config: UnifiedConfig) -> Plan:
    """Everything `execute` will do, checked against the model. Raises ValueError without touching the model."""
    if getattr(model, STATE_ATTR, None) is not None:
        raise ValueError("fastpeft.apply: the model is already patched by fastpeft; call fastpeft.remove(model) first")
    found = find_fastpeft_modules(model)
    if found:
        raise ValueError(f"fastpeft.apply: the model already contains fastpeft modules (at {found[0]!r})")
    arch = find_arch(model)
    model_config = model.config
    base = _base_path(model)
    plan = Plan(arch=arch, config=config, hidden_size=model_config.hidden_size)

    stacks = []  # (stack, [(global index, layer path)])
    total = 0
    for stack in arch.stacks:
        layers_path = _join(base, stack.layers)
        layers = _module(model, layers_path, f"the {stack.name} layers")
        stacks.append((stack, [(total + i, _join(layers_path, str(i))) for i in range(len(layers))]))
        total += len(layers)
    for site, method in config.methods():
        if method.layers is not None and method.layers and method.layers[-1] >= total:
            raise ValueError(
                f"fastpeft.apply: {type(method).__name__}.layers must be indices in [0, {total}) for this model "
                f"({total} layers, encoder layers first), got {list(method.layers)}"
            )

    for site, method in config.methods():
        if isinstance(method, LoRAConfig):
            _plan_lora(model, plan, stacks, method)
        elif isinstance(method, AdapterConfig):
            _plan_adapter(model, plan, stacks, site, method)
        else:
            _plan_prefix(model, plan, stacks, method)

    if not (plan.lora or plan.adapters or plan.prefix_sites):
        raise ValueError(f"fastpeft.apply: the config selects no site of this model: {config}")

    entries = ["", base] + [_join(base, stack.layers.rpartition(".")[0]) for stack, _ in stacks]
    plan.entries = list(dict.fromkeys(entries))
    plan.embeddings = [_join(base, path) for path in arch.embeddings]
    for path in plan.embeddings:
        _module(model, path, "token embeddings")
    plan.probe = stacks[0][1][0][1] if stacks[0][1] else ""
    return plan


def _plan_lora(model, plan: Plan, stacks, method: LoRAConfig) -> None:
    targets: dict = {}  # path -> {role: part}
    for stack, layers in stacks:
        attentions = [stack.self_attention]
        if stack.cross_attention is not None and method.cross_attention:
            attentions.append(stack.cross_attention)
        for index, layer in layers:
            if not _selected(method, index):
                continue
            for role in method.targets:
                if role in ("ffn_in", "ffn_out"):
                    projs = getattr(stack, role)
                else:
                    projs = [p for attention in attentions for p in getattr(attention, role)]
                for proj in projs:
                    targets.setdefault(_join(layer, proj.path), {})[role] = proj
    for path, roles in targets.items():
        module = _module(model, path, "a LoRA target")
        features = linear_features(module)
        if features is None:
            raise ValueError(
                f"fastpeft.apply: LoRA target {path!r} must be nn.Linear or Conv1D, got {type(module).__name__}"
            )
        parts = {}
        for role, proj in roles.items():
            if proj.part is None:
                parts[role] = None
            else:
                if features[1] % proj.parts:
                    raise ValueError(
                        f"fastpeft.apply: fused projection {path!r} has {features[1]} outputs, not divisible into "
                        f"{proj.parts} equal slices"
                    )
                parts[role] = (proj.part, proj.parts)
        sliced = [part for part in parts.values() if part is not None]
        if method.fuse_slices and sliced and len(sliced) == sliced[0][1]:
            # Every slice of the fused projection is targeted: one LoRA over its whole output.
            ordered = sorted(parts, key=lambda role: parts[role][0])
            parts = {"_".join(ordered): None}
        plan.lora.append(LoRAPlan(path, parts, method))


def _plan_adapter(model, plan: Plan, stacks, site: str, method: AdapterConfig) -> None:
    for stack, layers in stacks:
        spec = stack.attn_adapter if site == "attn" else stack.ffn_adapter
        for index, layer in layers:
            if not _selected(method, index):
                continue
            path = _join(layer, spec.out)
            module = _module(model, path, f"the {site} output projection")
            features = linear_features(module)
            if features is not None and features[1] != plan.hidden_size:
                raise ValueError(
                    f"fastpeft.apply: {path!r} has {features[1]} outputs, expected the hidden size {plan.hidden_size}"
                )
            x_from = post_norm = None
            x_arg = spec.x_arg
            if method.original_ln_before:
                if spec.post_norm is None:
                    raise ValueError(
                        f"fastpeft.apply: AdapterConfig.original_ln_before needs a post-LN architecture (bert, "
                        f"roberta, bart); {plan.arch.name} normalises before its sublayers"
                    )
                post_norm = _join(layer, spec.post_norm)
                _module(model, post_norm, f"the LayerNorm after the {site} sublayer")
            if (method.residual_input or method.original_ln_before) and spec.residual_from is not None:
                # Pre-LN: the residual stream is the input of the LayerNorm in front of the sublayer.
                x_from = _join(layer, spec.residual_from[0])
                x_arg = spec.residual_from[1:]
                _module(model, x_from, f"the LayerNorm in front of the {site} sublayer")
            elif method.insertion == "parallel" or method.original_ln_before or method.residual_input:
                # Post-LN models: the sublayer's input is the block's residual stream too.
                x_from = _join(layer, spec.x_from)
                _module(model, x_from, f"the {site} sublayer")
            plan.adapters.append(AdapterPlan(path, x_from, x_arg, plan.hidden_size, method, post_norm))


def _plan_prefix(model, plan: Plan, stacks, method: PrefixConfig) -> None:
    config = model.config
    implementation = config._attn_implementation
    if implementation not in PREFIX_IMPLEMENTATIONS:
        raise ValueError(
            f"fastpeft.apply: prefix tuning supports attn_implementation {PREFIX_IMPLEMENTATIONS}, this model uses "
            f"{implementation!r}; load it with attn_implementation='sdpa'"
        )
    plan.prefix_config = method
    if method.shift_positions:
        _plan_positions(model, plan)
    for stack, layers in stacks:
        heads, kv_heads, head_dim = head_geometry(config, stack)
        attentions = [(stack.self_attention, stack.name)]
        if stack.cross_attention is not None and method.cross_attention:
            attentions.append((stack.cross_attention, "cross"))
        for index, layer in layers:
            if not _selected(method, index):
                continue
            for attention, kind in attentions:
                path = _join(layer, attention.module)
                module = _module(model, path, "an attention module")
                q = _module(model, _join(layer, attention.q[0].path), "a query projection")
                q_out = linear_features(q)
                q_parts = attention.q[0].parts
                if q_out is not None and q_out[1] != heads * head_dim * q_parts:
                    raise ValueError(
                        f"fastpeft.apply: {path!r} projects queries to {q_out[1] // q_parts} features, expected "
                        f"{heads} heads x {head_dim}"
                    )
                legacy = not _uses_attention_interface(module)
                if legacy:
                    _check_legacy_attention(plan.arch, path, module)
                plan.prefix_sites.append(
                    PrefixSitePlan(path, kv_heads, head_dim, default_scaling(module, head_dim), legacy, kind)
                )
    head_dims = sorted({site.head_dim for site in plan.prefix_sites})
    if len(head_dims) > 1:  # one [rows, L, D] tensor holds every prefix
        raise ValueError(f"fastpeft.apply: prefix tuning needs one head size across attentions, got {head_dims}")


def _plan_positions(model, plan: Plan) -> None:
    positions = plan.arch.positions
    if positions is None:
        raise ValueError(
            f"fastpeft.apply: PrefixConfig.shift_positions is not supported for {plan.arch.name} (fastpeft does not "
            "know where its token positions enter the model)"
        )
    plan.positions = _join(_base_path(model), positions.module)
    _module(model, plan.positions, "the module the token positions enter")


def _check_legacy_attention(arch: Arch, path: str, module: nn.Module) -> None:
    if arch.legacy_attention != "bert":
        raise ValueError(
            f"fastpeft.apply: attention {path!r} ({type(module).__name__}) does not route through transformers' "
            "attention interface and fastpeft has no other way in for it"
        )
    if "forward" in vars(module):
        raise ValueError(
            f"fastpeft.apply: attention {path!r} already has a forward replaced on the instance (an accelerate "
            "dispatch hook?); prefix tuning on it needs transformers >= 5 or a model without such hooks"
        )
    if getattr(module, "is_decoder", False):
        raise ValueError(
            f"fastpeft.apply: prefix tuning on {arch.name} with transformers < 5 supports encoder use only "
            "(config.is_decoder is True)"
        )
    if getattr(module, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"fastpeft.apply: prefix tuning on {arch.name} needs position_embedding_type 'absolute', got "
            f"{module.position_embedding_type!r}"
        )
