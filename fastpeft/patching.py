"""Planning and undoing the insertion of methods into a model.

`build_plan` checks everything against the model and the architecture table without touching the model;
`execute` then mutates it (module wrappers, hooks, the prefix encoder, requires_grad), recording each step in a
`PatchState` stored on the model, so that `undo` can restore the exact original from any point.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from fastpeft.architectures import Arch, find_arch
from fastpeft.config import AdapterConfig, LoRAConfig, PrefixConfig, UnifiedConfig
from fastpeft.modules._common import remove_hooks
from fastpeft.modules.adapter import AdapterLayer, BottleneckAdapter, CaptureInput
from fastpeft.modules.lora import LoRALinear, linear_features
from fastpeft.modules.prefix import (
    INTERFACE_NAME,
    EnterForward,
    ExitForward,
    PrefixEncoder,
    PrefixSite,
    default_scaling,
    legacy_bert_self_attention_forward,
    register_interface,
)

STATE_ATTR = "_fastpeft"
PREFIX_ATTR = "fastpeft_prefix"
SITE_ATTR = "fastpeft_prefix_site"
PREFIX_IMPLEMENTATIONS = ("eager", "sdpa")
_FASTPEFT_MODULES = (AdapterLayer, LoRALinear, PrefixEncoder)


# ----------------------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LoRAPlan:
    path: str
    parts: dict  # role -> None | (index, count)
    config: LoRAConfig


@dataclass
class AdapterPlan:
    path: str  # the output projection
    x_from: Optional[str]  # the module receiving the sublayer input (parallel, or original_ln_before)
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


def _head_geometry(config, stack) -> tuple:
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
            if method.original_ln_before:
                if spec.post_norm is None:
                    raise ValueError(
                        f"fastpeft.apply: AdapterConfig.original_ln_before needs a post-LN architecture (bert, "
                        f"roberta, bart); {plan.arch.name} normalises before its sublayers"
                    )
                post_norm = _join(layer, spec.post_norm)
                _module(model, post_norm, f"the LayerNorm after the {site} sublayer")
            if method.insertion == "parallel" or method.original_ln_before:
                x_from = _join(layer, spec.x_from)
                _module(model, x_from, f"the {site} sublayer")
            plan.adapters.append(AdapterPlan(path, x_from, spec.x_arg, plan.hidden_size, method, post_norm))


def _plan_prefix(model, plan: Plan, stacks, method: PrefixConfig) -> None:
    config = model.config
    implementation = config._attn_implementation
    if implementation not in PREFIX_IMPLEMENTATIONS:
        raise ValueError(
            f"fastpeft.apply: prefix tuning supports attn_implementation {PREFIX_IMPLEMENTATIONS}, this model uses "
            f"{implementation!r}; load it with attn_implementation='sdpa'"
        )
    plan.prefix_config = method
    for stack, layers in stacks:
        heads, kv_heads, head_dim = _head_geometry(config, stack)
        attentions = [stack.self_attention]
        if stack.cross_attention is not None and method.cross_attention:
            attentions.append(stack.cross_attention)
        for index, layer in layers:
            if not _selected(method, index):
                continue
            for attention in attentions:
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
                    PrefixSitePlan(path, kv_heads, head_dim, default_scaling(module, head_dim), legacy)
                )
    head_dims = sorted({site.head_dim for site in plan.prefix_sites})
    if len(head_dims) > 1:  # one [rows, L, D] tensor holds every prefix
        raise ValueError(f"fastpeft.apply: prefix tuning needs one head size across attentions, got {head_dims}")


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


# ----------------------------------------------------------------------------------------------------------------
# State, execute, undo
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PatchState:
    """What fastpeft did to a model: enough to save the method, and to undo it exactly."""

    config: UnifiedConfig
    arch: str
    model_type: str
    requires_grad: dict = field(default_factory=dict)  # parameter name -> flag before apply
    lora_paths: list = field(default_factory=list)
    adapter_paths: list = field(default_factory=list)
    capture_paths: list = field(default_factory=list)
    prefix_paths: list = field(default_factory=list)
    hook_paths: list = field(default_factory=list)  # modules with EnterForward / ExitForward
    embedding_paths: list = field(default_factory=list)
    prefix_module: bool = False
    trained: list = field(default_factory=list)  # names of the parameters the method trains
    # Original values (CPU copies) of the model's own parameters the method trains (task head, norms).
    trained_originals: dict = field(default_factory=dict)
    merged: dict = field(default_factory=dict)  # LoRA path -> original weight (CPU), after merge_lora

    @property
    def site_names(self) -> list:
        return list(self.prefix_paths)


class RequireInputGrad:
    """Forward hook on the token embeddings: under reentrant gradient checkpointing, a checkpointed layer only
    back-propagates when one of its inputs requires grad, which frozen embeddings do not (transformers'
    `enable_input_require_grads` for PEFT models). Active only while checkpointing and training."""

    def __init__(self, probe_holder: list):
        self.probe_holder = probe_holder

    def __call__(self, module, args, output):
        probe = self.probe_holder[0] if self.probe_holder else None
        if (
            probe is not None
            and getattr(probe, "gradient_checkpointing", False)
            and probe.training
            and torch.is_grad_enabled()
            and isinstance(output, torch.Tensor)
            and not output.requires_grad
        ):
            return output.requires_grad_(True)
        return None


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` kept off the accelerator (meta tensors have no data: they stay on meta)."""
    return t.detach().clone() if t.device.type == "meta" else t.detach().to("cpu", copy=True)


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def execute(model: nn.Module, plan: Plan) -> PatchState:
    """Apply `plan`. On any error, undo what was done and re-raise: the model is left as it was."""
    state = PatchState(config=plan.config, arch=plan.arch.name, model_type=model.config.model_type)
    state.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    setattr(model, STATE_ATTR, state)
    try:
        _execute(model, plan, state)
    except BaseException:
        undo(model, state)
        raise
    return state


def _execute(model: nn.Module, plan: Plan, state: PatchState) -> None:
    probe = [model.get_submodule(plan.probe)] if plan.probe else []
    method_params = []

    for lora in plan.lora:
        wrapper = LoRALinear(model.get_submodule(lora.path), lora.parts, lora.config)
        _set_module(model, lora.path, wrapper)
        state.lora_paths.append(lora.path)
        method_params += list(wrapper.lora_A.values()) + list(wrapper.lora_B.values())

    for item in plan.adapters:
        base = model.get_submodule(item.path)
        weight = next(base.parameters(), None)
        factory = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
        adapter = BottleneckAdapter(item.features, item.features, item.config, **factory)
        norm = model.get_submodule(item.post_norm) if item.post_norm else None
        wrapper = AdapterLayer(base, adapter, sequential=item.config.insertion == "sequential", post_norm=norm)
        _set_module(model, item.path, wrapper)
        state.adapter_paths.append(item.path)
        if item.x_from is not None:
            source = model.get_submodule(item.x_from)
            source.register_forward_pre_hook(CaptureInput(wrapper, *item.x_arg), with_kwargs=True)
            state.capture_paths.append(item.x_from)
        method_params += list(adapter.parameters())

    if plan.prefix_sites:
        _execute_prefix(model, plan, state, probe)
        method_params += list(getattr(model, PREFIX_ATTR).parameters())

    hook = RequireInputGrad(probe)
    for path in plan.embeddings:
        model.get_submodule(path).register_forward_hook(hook)
        state.embedding_paths.append(path)

    _freeze(model, plan.config, method_params)
    state.trained = [name for name, p in model.named_parameters() if p.requires_grad]
    inserted = {id(p) for p in method_params}
    state.trained_originals = {
        name: host_copy(p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in inserted
    }


def _execute_prefix(model: nn.Module, plan: Plan, state: PatchState, probe: list) -> None:
    sites = plan.prefix_sites
    reference = next(model.parameters())
    encoder = PrefixEncoder(
        plan.prefix_config,
        plan.hidden_size,
        [s.kv_heads for s in sites],
        sites[0].head_dim,
        device=reference.device,
        dtype=reference.dtype,
    )
    encoder.checkpoint_probe = probe
    model.add_module(PREFIX_ATTR, encoder)
    state.prefix_module = True
    if any(not s.legacy for s in sites):
        register_interface()
    for index, item in enumerate(sites):
        module = model.get_submodule(item.path)
        if item.legacy:
            site = PrefixSite(encoder, index, item.scaling)
            module.forward = legacy_bert_self_attention_forward.__get__(module)
        else:
            site = PrefixSite(encoder, index, item.scaling, original_config=module.config)
            # The module's own config copy routes only this module to fastpeft's attention function.
            own = copy.copy(module.config)
            own._attn_implementation = INTERFACE_NAME
            module.config = own
        setattr(module, SITE_ATTR, site)
        state.prefix_paths.append(item.path)
    enter, exit_ = EnterForward(encoder), ExitForward(encoder)
    for path in plan.entries:
        module = model.get_submodule(path)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(exit_, always_call=True)
        state.hook_paths.append(path)


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm") or name.endswith("RMSNorm")


def _freeze(model: nn.Module, config: UnifiedConfig, method_params: list) -> None:
    """Freeze everything, then train the method's parameters, plus the task head and norms when configured."""
    trained = {id(p) for p in method_params}
    if config.train_layernorm:
        trained |= {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    if config.train_head:
        trained |= {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)


def head_parameters(model: nn.Module) -> list:
    """Parameters outside the base model (the task head), except the output embeddings (a pretrained LM head)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return []
    inside = {id(p) for p in base.parameters()} | {id(p) for m in model.modules() if isinstance(m, PrefixEncoder) for p in m.parameters()}
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output_embeddings is not None:
        inside |= {id(p) for p in output_embeddings.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


def undo(model: nn.Module, state: PatchState) -> None:
    """Restore the model exactly: in reverse order of `execute`, from whatever point it reached."""
    for path in state.embedding_paths:
        remove_hooks(model.get_submodule(path), RequireInputGrad)
    for path in state.hook_paths:
        module = model.get_submodule(path)
        remove_hooks(module, EnterForward)
        remove_hooks(module, ExitForward)
    for path in state.prefix_paths:
        module = model.get_submodule(path)
        site = module.__dict__.pop(SITE_ATTR, None)
        module.__dict__.pop("forward", None)
        if site is not None and site.original_config is not None:
            module.config = site.original_config
    if state.prefix_module:
        delattr(model, PREFIX_ATTR)
    for path in state.capture_paths:
        remove_hooks(model.get_submodule(path), CaptureInput)
    for path in reversed(state.adapter_paths):
        _set_module(model, path, model.get_submodule(path).base_layer)
    for path in reversed(state.lora_paths):
        module = model.get_submodule(path)
        if isinstance(module, LoRALinear):
            module = module.base_layer
            _set_module(model, path, module)
        original = state.merged.get(path)
        if original is not None:
            with torch.no_grad():
                module.weight.copy_(original.to(device=module.weight.device, dtype=module.weight.dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            original = state.trained_originals.get(name)
            if original is not None:
                p.copy_(original.to(device=p.device, dtype=p.dtype))
            if name in state.requires_grad:
                p.requires_grad_(state.requires_grad[name])
    if getattr(model, STATE_ATTR, None) is state:
        delattr(model, STATE_ATTR)


def get_state(model: nn.Module, op: str) -> PatchState:
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, PatchState):
        raise ValueError(f"fastpeft.{op}: the model is not patched by fastpeft (call fastpeft.apply first)")
    return state

