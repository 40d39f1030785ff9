"""Applying a plan to a model, and undoing it exactly.

`execute` mutates the model (module wrappers, hooks, the prefix encoder, requires_grad), recording each step in a
`PatchState` stored on the model, so that `undo` can restore the exact original from any point (after an error
midway, or on `fastpeft.remove`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from fastpeft.config import UnifiedConfig
from fastpeft.modules._common import remove_hooks
from fastpeft.modules.adapter import AdapterLayer, BottleneckAdapter, CaptureInput
from fastpeft.modules.lora import LoRALinear
from fastpeft.modules.prefix import (
    INTERFACE_NAME,
    EnterForward,
    ExitForward,
    PrefixEncoder,
    PrefixSite,
    ShiftPositions,
    legacy_bert_self_attention_forward,
    register_interface,
)
from fastpeft.plan import STATE_ATTR, Plan, build_plan

PREFIX_ATTR = "fastpeft_prefix"
SITE_ATTR = "fastpeft_prefix_site"

__all__ = ["build_plan", "execute", "undo", "get_state", "PatchState", "STATE_ATTR", "PREFIX_ATTR"]


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
    positions_path: str = ""  # module with the ShiftPositions hook (PrefixConfig.shift_positions)
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
        base = model.get_submodule(lora.path)
        # New modules start in train mode; they follow the module they wrap (its dropout must not act in eval).
        wrapper = LoRALinear(base, lora.parts, lora.config).train(base.training)
        _set_module(model, lora.path, wrapper)
        state.lora_paths.append(lora.path)
        method_params += list(wrapper.lora_A.values()) + list(wrapper.lora_B.values())

    for item in plan.adapters:
        base = model.get_submodule(item.path)
        weight = next(base.parameters(), None)
        factory = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
        adapter = BottleneckAdapter(item.features, item.features, item.config, **factory)
        norm = model.get_submodule(item.post_norm) if item.post_norm else None
        wrapper = AdapterLayer(
            base,
            adapter,
            sequential=item.config.insertion == "sequential",
            post_norm=norm,
            reads_sum=item.config.residual_input,
        ).train(base.training)
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
        kinds=[s.kind for s in sites],
        device=reference.device,
        dtype=reference.dtype,
    )
    encoder.checkpoint_probe = probe
    encoder.train(model.training)
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
    if plan.positions is not None:
        shift = ShiftPositions(plan.prefix_config.length, plan.arch.positions)
        model.get_submodule(plan.positions).register_forward_pre_hook(shift, with_kwargs=True)
        state.positions_path = plan.positions


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
    if state.positions_path:
        remove_hooks(model.get_submodule(state.positions_path), ShiftPositions)
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

