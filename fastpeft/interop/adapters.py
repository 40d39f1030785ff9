"""From AdapterHub `adapters`: bottleneck adapters, prefix tuning and LoRA (and unions of them, such as mam), from a
live model or from a `save_adapter` directory.

How AdapterHub's conventions are reproduced (h: the sublayer's output, r: the block's residual stream, s: scaling):

- `seq_bn` (original_ln_before, residual_before_ln): in post-LN models (BERT, RoBERTa, BART) the adapter reads
  LN(h + r) through the block's own LayerNorm and adds onto h, then the block applies LN again: the pretrained
  LayerNorm runs twice (`AdapterConfig.original_ln_before`). In pre-LN models (GPT-2, Llama, Mistral, Qwen2, mBART)
  there is no LayerNorm there: it reads h + r (`AdapterConfig.residual_input`).
- `double_seq_bn`: h + s f(h) after the attention and the FFN.
- `par_bn` / `scaled_par_bn`: h + s f(r), r the residual stream, which in pre-LN models is the block's input
  before its LayerNorm, not the sublayer's normalised input (`residual_input`); scaling 4.0 or learned.
- Dropout is on s * Delta h (`dropout_position="output"`).
- Prefix tuning: concatenated onto the keys and values of every attention after the cache and after rotary
  embeddings, seen by every query, positions unchanged: fastpeft's own prefix. One MLP per kind of attention
  (encoder self, decoder self, cross; `PrefixConfig.reparam_per_kind`) or flat parameters.
- LoRA: y = W x + (alpha / r) B A dropout(x) on the projections that hold LoRA weights; on GPT-2's fused `c_attn`
  one A and B per q, k, v slice (fastpeft's per-role form).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from fastpeft.architectures import find_arch
from fastpeft.config import AdapterConfig, PrefixConfig, UnifiedConfig
from fastpeft.interop._common import (
    ConversionError,
    LoRAUnit,
    Writer,
    _roles_of,
    apply_with_weights,
    locate,
    lora_config,
    planned_units,
    rebuild,
    transformers_class,
)
from fastpeft.patching import PREFIX_ATTR, build_plan

# AdapterHub's activation names (transformers' `get_activation`) -> fastpeft's.
_ACTIVATIONS = {
    "relu": "relu",
    "swish": "silu",
    "silu": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "tanh": "tanh",
    "linear": "identity",
}
# adapter-transformers' names, renamed by AdapterHub when it loads a file without a "version".
_OLD_ACTIVATION_NAMES = {"gelu": "gelu_new", "gelu_orig": "gelu"}
_INITS = {"bert": "bert", "mam_adapter": "lora", "houlsby": "houlsby"}
# Where AdapterHub keeps a layer's bottleneck adapters (relative to the layer): BERT's BertSelfOutput / BertOutput
# are adapter layers themselves; other models hold `attention_adapters` / `output_adapters` modules.
_BOTTLENECK_SITES = {
    "attention.output": "attn",
    "output": "ffn",
    "attention_adapters": "attn",
    "output_adapters": "ffn",
}
# Architectures whose AdapterHub attention code loses the prefix under sdpa: boolean masks get the prefix columns
# inverted to False (masked out), and a missing mask becomes sdpa's top-left causal alignment.
_PREFIX_NEEDS_EAGER = ("gpt2", "llama", "mistral", "bart", "mbart")

# Bottleneck fields: the only value fastpeft reproduces, for those it does not carry over.
_BN_REQUIRED = {
    "original_ln_after": True,
    "ln_before": False,
    "ln_after": False,
    "use_gating": False,
    "cross_adapter": False,
    "inv_adapter": None,
    "phm_layer": False,
    "stochastic_depth": 0.0,
}
_BN_CARRIED = {
    "architecture", "mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before",
    "init_weights", "init_weights_seed", "is_parallel", "scaling", "residual_before_ln", "leave_out", "dropout",
    # Only meaningful with fields refused above (ln_after, inv_adapter, phm_layer).
    "adapter_residual_before_ln", "inv_adapter_reduction_factor", "phm_dim", "factorized_phm_W", "shared_W_phm",
    "shared_phm_rule", "factorized_phm_rule", "phm_c_init", "phm_init_range", "learn_phm", "hypercomplex_nonlinearity",
    "phm_rank", "phm_bias",
}  # fmt: skip
_PREFIX_REQUIRED = {"dropout": 0.0, "use_gating": False}
_PREFIX_CARRIED = {
    "architecture", "encoder_prefix", "cross_prefix", "leave_out", "flat", "prefix_length", "bottleneck_size",
    "non_linearity", "shared_gating", "init_weights_seed",
}  # fmt: skip
_LORA_REQUIRED = {
    "composition_mode": "add",
    "use_gating": False,
    "use_dora": False,
    "vera_d": None,
    "vera_b": None,
    "dtype": None,
}
_LORA_CARRIED = {
    "architecture", "selfattn_lora", "intermediate_lora", "output_lora", "leave_out", "r", "alpha", "dropout",
    "attn_matrices", "init_weights", "init_weights_seed",
}  # fmt: skip


def from_adapters(model: nn.Module) -> nn.Module:
    """The model prepared with AdapterHub `adapters` (`adapters.init` or an `*AdapterModel`) running its active
    adapter on fastpeft.

    Returns a new transformers model of the model's original class (for an `*AdapterModel`, of its base transformer,
    such as `BertModel`: AdapterHub's prediction heads are not transformers modules and are not converted) that
    shares the base weights with `model` (nothing is copied; `model` is left as it was) and carries fastpeft modules
    holding copies of the adapter's weights. Raises `ConversionError` naming the flag when the adapter uses something
    fastpeft cannot reproduce exactly.
    """
    where = "fastpeft.from_adapters"
    try:
        import adapters
    except ImportError as error:
        raise ConversionError(f"{where}: AdapterHub adapters is not usable here: {error}") from None
    if not isinstance(model, adapters.ModelAdaptersMixin) and not isinstance(
        getattr(model, "base_model", None), adapters.ModelAdaptersMixin
    ):
        raise TypeError(f"{where}: 'model' must be prepared with adapters.init or be an *AdapterModel, got {type(model).__name__}")
    setup = model.active_adapters
    if setup is None:
        raise ConversionError(f"{where}: the model has no active adapter; call model.set_active_adapters(name)")
    names = setup.flatten()
    if not isinstance(setup, adapters.Stack) or len(names) != 1:
        raise ConversionError(f"{where}: the active setup {setup} composes several adapters; fastpeft converts one adapter")
    (name,) = names
    config = adapters.AdapterConfig.load(model.adapters_config.get(name)).to_dict()
    marks = _weight_marks(name)
    tensors = {k: v for k, v in model.state_dict().items() if any(m in k for m in marks)}
    with_heads = isinstance(model, adapters.ModelWithFlexibleHeadsAdaptersMixin)
    source = model.base_model if with_heads else model
    lookup = dict(source.named_parameters(remove_duplicate=False))
    lookup.update(source.named_buffers(remove_duplicate=False))
    converted = rebuild(source, transformers_class(source), lookup.get, where)
    if _has_prefix(config) and converted.config.model_type in _PREFIX_NEEDS_EAGER:
        implementation = converted.config._attn_implementation
        if implementation != "eager":
            raise ConversionError(
                f"{where}: prefix tuning with attn_implementation={implementation!r} on {converted.config.model_type} "
                "is not supported: AdapterHub's attention there masks the prefix out under sdpa (its boolean masks get "
                "the prefix inverted), so its outputs are not prefix tuning; load the model with "
                "attn_implementation='eager', which AdapterHub computes correctly"
            )
    return _apply(converted, config, tensors, name, where)


def load_adapters_checkpoint(base_model: nn.Module, directory) -> nn.Module:
    """Patch `base_model` (a freshly loaded transformers model, the one the adapter was trained on) in place with the
    adapter that AdapterHub's `save_adapter` wrote to `directory`, and return it.

    Reads `adapter_config.json` and `adapter.safetensors` (or `pytorch_adapter.bin`, loaded with `weights_only=True`);
    a prediction head saved alongside is not loaded. Raises `ConversionError` naming the flag when the adapter uses
    something fastpeft cannot reproduce exactly; on any error `base_model` is left as it was.
    """
    where = "fastpeft.load_adapters_checkpoint"
    config_path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{where}: {config_path!r} not found (expected an adapters save_adapter directory)")
    with open(config_path) as f:
        record = json.load(f)
    for key in ("config", "name"):
        if key not in record:
            raise ConversionError(f"{where}: {config_path!r} lacks the field {key!r}")
    model_type = getattr(getattr(base_model, "config", None), "model_type", None)
    if record.get("model_type") not in (None, model_type):
        raise ConversionError(
            f"{where}: the adapter was saved from a {record['model_type']!r} model, this model is {model_type!r}"
        )
    safe = os.path.join(directory, "adapter.safetensors")
    pickled = os.path.join(directory, "pytorch_adapter.bin")
    if os.path.isfile(safe):
        from safetensors.torch import load_file

        tensors = load_file(safe)
    elif os.path.isfile(pickled):
        tensors = torch.load(pickled, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{where}: no adapter.safetensors or pytorch_adapter.bin in {str(directory)!r}")
    config = dict(record["config"])
    if "version" not in record and config.get("non_linearity") in _OLD_ACTIVATION_NAMES:
        # Files from adapter-transformers (no "version") name the activations as AdapterHub's loader renames them.
        config["non_linearity"] = _OLD_ACTIVATION_NAMES[config["non_linearity"]]
    return _apply(base_model, config, tensors, record["name"], where)


# ----------------------------------------------------------------------------------------------------------------
# Config translation
# ----------------------------------------------------------------------------------------------------------------


def _weight_marks(name: str) -> tuple:
    # The parameter-name fragments of one adapter's weights, as AdapterHub's save_adapter selects them.
    return (f".adapters.{name}.", f".prefix_tunings.{name}.", f".loras.{name}.", f"_adapters.{name}.",
            f".prefix_gates.{name}.", f".refts.{name}.", f".prompt_tunings.{name}.", f".shared_parameters.{name}.")  # fmt: skip


def _parts(config: dict) -> list:
    return list(config["configs"]) if config.get("architecture") == "union" else [config]


def _has_prefix(config: dict) -> bool:
    return any(part.get("architecture") == "prefix_tuning" for part in _parts(config))


def _check(part: dict, carried: set, required: dict, what: str, where: str) -> None:
    for key, value in part.items():
        if key in required:
            if value != required[key]:
                raise ConversionError(
                    f"{where}: {what}.{key}={value!r} is not supported (fastpeft reproduces {key}={required[key]!r} only)"
                )
        elif key not in carried and value not in (None, False, {}, [], 0, 0.0):
            raise ConversionError(f"{where}: {what}.{key}={value!r} is not supported by fastpeft's conversion")


def _layers(total: int, leave_out) -> tuple:
    return tuple(i for i in range(total) if i not in set(leave_out or ()))


def _bottleneck(part: dict, arch, model: nn.Module, total: int, where: str) -> dict:
    """{site: AdapterConfig} for one AdapterHub bottleneck config."""
    what = "BnConfig"
    _check(part, _BN_CARRIED, _BN_REQUIRED, what, where)
    activation = _ACTIVATIONS.get(str(part["non_linearity"]).lower())
    if activation is None:
        raise ConversionError(
            f"{where}: {what}.non_linearity={part['non_linearity']!r} is not supported; fastpeft has {sorted(_ACTIVATIONS)}"
        )
    scaling = part.get("scaling", 1.0)
    if scaling != "learned" and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))):
        raise ConversionError(f"{where}: {what}.scaling={scaling!r} is not supported (a number or 'learned')")
    parallel = bool(part.get("is_parallel", False))
    ln_before = bool(part.get("original_ln_before", False))
    if ln_before and not parallel and part.get("residual_before_ln", True) is not True:
        raise ConversionError(
            f"{where}: {what}.residual_before_ln={part['residual_before_ln']!r} is not supported with "
            "original_ln_before=True (fastpeft's adapter adds onto the sublayer output h)"
        )
    layers = _layers(total, part.get("leave_out"))
    hidden = model.config.hidden_size
    ranks = {_rank(part["reduction_factor"], i, hidden, where) for i in layers}
    if len(ranks) != 1:
        raise ConversionError(
            f"{where}: {what}.reduction_factor={part['reduction_factor']!r} gives different sizes per layer; "
            "fastpeft uses one size per site"
        )
    (r,) = ranks
    sites = [site for site, key in (("attn", "mh_adapter"), ("ffn", "output_adapter")) if part.get(key)]
    out = {}
    for site in sites:
        spec = arch.stacks[0].attn_adapter if site == "attn" else arch.stacks[0].ffn_adapter
        post_ln = spec.post_norm is not None
        out[site] = AdapterConfig(
            r=r,
            activation=activation,
            insertion="parallel" if parallel else "sequential",
            site=site,
            scale="learned" if scaling == "learned" else float(scaling),
            init=_INITS.get(part.get("init_weights", "bert"), "bert"),
            dropout=float(part.get("dropout", 0.0)),
            dropout_position="output",
            layers=layers if len(layers) < total else None,
            original_ln_before=ln_before and not parallel and post_ln,
            # Parallel: AdapterHub reads the residual stream; sequential original_ln_before in pre-LN models: h + r.
            residual_input=parallel or (ln_before and not post_ln),
        )
    return out


def _rank(factor, layer: int, hidden: int, where: str) -> int:
    if isinstance(factor, Mapping):
        if str(layer) in factor:
            factor = factor[str(layer)]
        elif "default" in factor:
            factor = factor["default"]
        else:
            raise ConversionError(f"{where}: BnConfig.reduction_factor={dict(factor)!r} has no value for layer {layer}")
    return max(1, int(hidden // factor))


def _prefix(part: dict, counts: list, where: str) -> PrefixConfig:
    """The PrefixConfig for one AdapterHub prefix config; `counts`: layers per stack (encoder first)."""
    what = "PrefixTuningConfig"
    _check(part, _PREFIX_CARRIED, _PREFIX_REQUIRED, what, where)
    flat = bool(part.get("flat", False))
    if not flat and part.get("non_linearity", "tanh") != "tanh":
        raise ConversionError(f"{where}: {what}.non_linearity={part['non_linearity']!r} is not supported (tanh only)")
    total = sum(counts)
    leave_out = set(part.get("leave_out") or ())
    encoder_decoder = len(counts) > 1
    if encoder_decoder and not part.get("encoder_prefix", True):
        leave_out |= set(range(counts[0]))
    layers = _layers(total, leave_out)
    cross = bool(part.get("cross_prefix", True))
    return PrefixConfig(
        length=part.get("prefix_length", 30),
        reparam_dim=None if flat else part.get("bottleneck_size", 512),
        layers=layers if len(layers) < total else None,
        cross_attention=cross,
        # AdapterHub has one MLP per kind of attention (encoder self, decoder self, cross).
        reparam_per_kind=not flat and encoder_decoder,
    )


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------


def _apply(model: nn.Module, config: dict, tensors: dict, name: str, where: str) -> nn.Module:
    arch = find_arch(model)
    base = model.base_model
    counts = [len(base.get_submodule(stack.layers)) for stack in arch.stacks]
    total = sum(counts)
    sites: dict = {}

    def place(site: str, method, source: str) -> None:
        if site in sites:
            raise ConversionError(
                f"{where}: the adapter puts {source} and {sites[site][1]} at the same {site} site; fastpeft holds one "
                "method per site"
            )
        sites[site] = (method, source)

    lora_part = None
    for part in _parts(config):
        kind = part.get("architecture")
        if kind in (None, "bottleneck"):
            for site, method in _bottleneck(part, arch, model, total, where).items():
                place(site, method, "a bottleneck adapter")
        elif kind == "prefix_tuning":
            place("attn", _prefix(part, counts, where), "prefix tuning")
        elif kind == "lora":
            _check(part, _LORA_CARRIED, _LORA_REQUIRED, "LoRAConfig", where)
            lora_part = part
        else:
            raise ConversionError(f"{where}: AdapterHub method architecture={kind!r} is not supported by fastpeft")

    weights = _parse_weights(tensors, name, where)
    lora_targets = {}
    if lora_part is not None:
        units, lora_weights = _lora_units(arch, model, lora_part, weights["lora"], where)
        attn, ffn = lora_config(arch, model, units, where)
        for site, method in (("attn", attn), ("ffn", ffn)):
            if method is not None:
                place(site, method, "LoRA")
    elif weights["lora"]:
        raise ConversionError(f"{where}: the weights hold LoRA matrices but the config has no LoRA")
    unified = UnifiedConfig(attn=sites.get("attn", (None,))[0], ffn=sites.get("ffn", (None,))[0])
    if lora_part is not None:
        lora_targets = planned_units(arch, model, unified)
    adapter_paths = _adapter_paths(arch, model, unified)

    def fill(write: Writer):
        if lora_part is not None:
            for unit, (a, b) in lora_weights.items():
                path, role = lora_targets[unit]
                write(f"{path}.lora_A.{role}", a, f"lora_A of {path}")
                write(f"{path}.lora_B.{role}", b, f"lora_B of {path}")
        for (source, param), value in weights["bottleneck"].items():
            found = locate(arch, model, source)
            site = _BOTTLENECK_SITES.get(found[1]) if found else None
            if site is None:
                raise ConversionError(f"{where}: the bottleneck adapter at {source!r} has no fastpeft site")
            path = adapter_paths.get((found[0], site))
            if path is None:
                raise ConversionError(
                    f"{where}: the weights hold a {site} adapter in layer {found[0]} that the config does not place"
                )
            write(f"{path}.adapter.{param}", value, f"the {site} adapter of layer {found[0]}")
        if weights["prefix"]:
            _fill_prefix(write, model, unified.attn, weights["prefix"], arch, where)

    return apply_with_weights(model, unified, fill, where)


def _parse_weights(tensors: dict, name: str, where: str) -> dict:
    """The source's weights by method: bottleneck {(module path, fastpeft param): t}, prefix {(location, param): t},
    lora {module path: {"lora_A": t, "lora_B": t}}."""
    out = {"bottleneck": {}, "prefix": {}, "lora": {}}
    bottleneck = re.compile(rf"^(.*)\.adapters\.{re.escape(name)}\.(adapter_down\.0\.weight|adapter_down\.0\.bias|adapter_up\.weight|adapter_up\.bias|scaling)$")
    prefix = re.compile(rf"\.prefix_tunings\.{re.escape(name)}\.(\w+)\.(wte\.weight|control_trans\.0\.weight|control_trans\.0\.bias|control_trans\.2\.weight|control_trans\.2\.bias|control_trans)$")
    lora = re.compile(rf"^(.*)\.loras\.{re.escape(name)}\.(lora_A|lora_B)$")
    params = {"adapter_down.0.weight": "down.weight", "adapter_down.0.bias": "down.bias", "adapter_up.weight": "up.weight",
              "adapter_up.bias": "up.bias", "scaling": "scale"}  # fmt: skip
    for key, value in tensors.items():
        if match := bottleneck.match(key):
            out["bottleneck"][(match.group(1), params[match.group(2)])] = value
        elif match := prefix.search(key):
            out["prefix"][(match.group(1), match.group(2))] = value  # the same pool tensors repeat in every layer
        elif match := lora.match(key):
            out["lora"].setdefault(match.group(1), {})[match.group(2)] = value
        else:
            raise ConversionError(f"{where}: the adapter's weight {key!r} belongs to a part fastpeft does not convert")
    return out


def _adapter_paths(arch, model: nn.Module, unified: UnifiedConfig) -> dict:
    """{(global layer, site): path of fastpeft's adapter wrapper} for the config's bottleneck adapters."""
    out = {}
    for item in build_plan(model, unified).adapters:
        layer, _ = locate(arch, model, item.path)
        out[(layer, item.config.site)] = item.path
    return out


def _lora_units(arch, model: nn.Module, part: dict, pairs: dict, where: str) -> tuple:
    settings = (part.get("r", 8), part.get("alpha", 8), False, float(part.get("dropout", 0.0)))
    matrices = [m for m in ("q", "k", "v") if m in (part.get("attn_matrices") or [])]
    units, weights = {}, {}
    for path, pair in pairs.items():
        found = locate(arch, model, path)
        if found is None or set(pair) != {"lora_A", "lora_B"}:
            raise ConversionError(f"{where}: LoRA on {path!r} cannot be converted: fastpeft adapts projections inside the layers only")
        layer, rel = found
        covered = _roles_of(arch, model, layer, rel, None)
        if len(covered) > 1:
            # A fused projection (GPT-2's c_attn): AdapterHub stacks one A and one B per enabled matrix, q, k, v order.
            a_parts = pair["lora_A"].chunk(len(matrices), dim=0)
            b_parts = pair["lora_B"].chunk(len(matrices), dim=0)
            for role, a, b in zip(matrices, a_parts, b_parts):
                unit = LoRAUnit(layer, rel, role)
                units[unit], weights[unit] = settings, (a, b)
        else:
            unit = LoRAUnit(layer, rel, None)
            units[unit], weights[unit] = settings, (pair["lora_A"], pair["lora_B"])
    if not units:
        raise ConversionError(f"{where}: the LoRA config adapts no projection of this model")
    return units, weights


def _fill_prefix(write: Writer, model: nn.Module, config: PrefixConfig, weights: dict, arch, where: str) -> None:
    encoder = getattr(model, PREFIX_ATTR)
    self_kind = arch.stacks[-1].name  # decoder-only models: "decoder"; BERT: "encoder"; BART: the decoder's
    kinds = {"encoder_prefix": "encoder", "self_prefix": self_kind, "cross_prefix": "cross"}
    by_kind: dict = {}
    for (location, param), value in weights.items():
        if location not in kinds:
            raise ConversionError(f"{where}: prefix location {location!r} is not one fastpeft knows")
        by_kind.setdefault(kinds[location], {})[param] = value
    if set(by_kind) != set(encoder.kinds):
        raise ConversionError(
            f"{where}: the prefix holds {sorted(by_kind)} attentions, the converted model prefixes {sorted(set(encoder.kinds))}"
        )
    names = {"wte.weight": "embedding", "control_trans.0.weight": "down.weight", "control_trans.0.bias": "down.bias",
             "control_trans.2.weight": "up.weight", "control_trans.2.bias": "up.bias"}  # fmt: skip
    if config.reparam_dim is not None:
        for kind, params in by_kind.items():
            holder = f"{PREFIX_ATTR}.reparams.{kind}." if config.reparam_per_kind else f"{PREFIX_ATTR}."
            for param, value in params.items():
                if param not in names:
                    raise ConversionError(f"{where}: the {kind} prefix has a flat {param!r}, the config an MLP")
                write(holder + names[param], value, f"the {kind} prefix MLP's {param}")
        return
    # Flat: each kind's [L * rows_k * D] vector is [L, rows_k, D]; its rows go to its sites in order.
    length, dim = encoder.length, encoder.head_dim
    per_kind = {}
    for kind, params in by_kind.items():
        flat = params.get("control_trans")
        rows = encoder.kind_rows(kind)
        if flat is None or flat.numel() != length * rows * dim:
            raise ConversionError(f"{where}: the flat {kind} prefix does not have {length} x {rows} x {dim} values")
        per_kind[kind] = flat.view(length, rows, dim).transpose(0, 1)
    write(f"{PREFIX_ATTR}.prefix", encoder.assemble(per_kind), "the flat prefix")
