"""From Hugging Face peft: LoRA and prefix tuning, from a live `PeftModel` or from a `save_pretrained` directory.

How peft's conventions are reproduced:

- LoRA: y = W x + s B A dropout(x), s = lora_alpha / r (or / sqrt(r) with `use_rslora`): fastpeft's LoRA with the
  same A, B, s and dropout. peft adapts whole modules; on GPT-2's fused `c_attn` that is one A shared by q, k and
  v (`LoRAConfig.fuse_slices`). Which modules are adapted is read from the adapter itself (the modules holding
  LoRA weights), and fastpeft's own plan must adapt exactly those.
- Prefix tuning: peft hands the prefix to the model as a prefilled KV cache: it is seen by every query, never
  rotated, and the real tokens' positions start after it (`PrefixConfig.shift_positions`). Its encoder is an
  embedding [L, layers * 2 * kv_width] (flat) or, with `prefix_projection`, Embedding(L, kv_width) -> Linear ->
  tanh -> Linear, whose output index (layer, key/value, head, dim) is fastpeft's prefix row layout.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from fastpeft.architectures import find_arch
from fastpeft.config import PrefixConfig, UnifiedConfig
from fastpeft.interop._common import (
    ConversionError,
    LoRAUnit,
    Writer,
    apply_with_weights,
    locate,
    lora_config,
    planned_units,
    rebuild,
    transformers_class,
)
from fastpeft.patching import PREFIX_ATTR, head_parameters
from fastpeft.plan import head_geometry

# Checkpoint keys start with the PeftModel's path to the transformers model: "base_model.model." for LoRA (the
# LoraModel wraps it), "base_model." for prompt learning.
KEY_PREFIXES = ("base_model.model.", "base_model.")

# LoraConfig fields that do not change the math of a converted adapter: bookkeeping, the rules that chose the
# adapted modules (the adapter's weights say which modules those are), and init settings (the weights are copied).
_LORA_NEUTRAL = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "rank_pattern", "modules_to_save", "init_lora_weights",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size",
    "runtime_config", "ensure_weight_tying",
    # peft sets it per module to match the layer type (True exactly for transformers' Conv1D); it describes the
    # base weight's layout, which fastpeft reads from the layer itself.
    "fan_in_fan_out",
}  # fmt: skip
# Fields that change the math, with the only value fastpeft reproduces.
_LORA_REQUIRED = {"bias": "none", "use_dora": False, "lora_bias": False, "use_qalora": False, "alpha_pattern": {}}
# Initialisations that also rewrite the base weights: a checkpoint made with them needs the rewritten base model,
# which `load_peft_checkpoint` is not given (`from_peft` takes the live, rewritten weights and is fine).
_INIT_KEEPS_BASE = (True, False, "gaussian", "eva", "orthogonal")
_PREFIX_NEUTRAL = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
    "num_layers", "modules_to_save", "init_weights", "encoder_hidden_size", "prefix_projection",
}  # fmt: skip


def from_peft(peft_model: nn.Module) -> nn.Module:
    """The base model of `peft_model` running its active LoRA or prefix-tuning adapter on fastpeft.

    Returns a new transformers model of the base model's class that shares the base weights with `peft_model`
    (nothing is copied; `peft_model` is left as it was) and carries fastpeft modules holding copies of the adapter's
    weights; its outputs and gradients are those of `peft_model`. Raises `ConversionError` naming the flag when the
    adapter uses something fastpeft cannot reproduce exactly.
    """
    where = "fastpeft.from_peft"
    try:
        import peft
    except ImportError:
        raise ConversionError(f"{where}: peft is not installed") from None
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"{where}: 'peft_model' must be a peft.PeftModel, got {type(peft_model).__name__}")
    active = peft_model.active_adapters
    if len(active) != 1:
        raise ConversionError(f"{where}: {len(active)} adapters are active ({active}); activate exactly one")
    (adapter,) = active
    config = peft_model.peft_config[adapter].to_dict()
    kind = _peft_type(config, where)
    _check_config(config, kind, where, loading=False)  # before anything is built
    base = peft_model.get_base_model()
    if any(getattr(m, "merged", False) for m in base.modules() if hasattr(m, "merged_adapters")):
        raise ConversionError(f"{where}: the LoRA weights are merged into the base model; call unmerge_adapter()")
    model = rebuild(base, transformers_class(base), _base_tensors(base, adapter), where)
    if kind == "LORA":
        state = peft.get_peft_model_state_dict(peft_model, adapter_name=adapter)
        return _apply_lora(model, config, state, where)
    encoder = peft_model.prompt_encoder[adapter]
    if config.get("prefix_projection") and not config.get("inference_mode"):
        weights = {
            "embedding": encoder.embedding.weight,
            "down.weight": encoder.transform[0].weight,
            "down.bias": encoder.transform[0].bias,
            "up.weight": encoder.transform[2].weight,
            "up.bias": encoder.transform[2].bias,
        }
    else:
        weights = {"prefix": encoder.embedding.weight}
    heads = {k: v for k, v in peft.get_peft_model_state_dict(peft_model, adapter_name=adapter).items()
             if k != "prompt_embeddings"}  # fmt: skip
    return _apply_prefix(model, config, weights, heads, where)


def load_peft_checkpoint(base_model: nn.Module, directory) -> nn.Module:
    """Patch `base_model` (a freshly loaded transformers model, the one the adapter was trained on) in place with the
    LoRA or prefix-tuning adapter that peft's `save_pretrained` wrote to `directory`, and return it.

    Reads `adapter_config.json` and `adapter_model.safetensors` (or `adapter_model.bin`, loaded with
    `weights_only=True`). Raises `ConversionError` naming the flag when the adapter uses something fastpeft cannot
    reproduce exactly; on any error `base_model` is left as it was.
    """
    where = "fastpeft.load_peft_checkpoint"
    config_path = os.path.join(directory, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{where}: {config_path!r} not found (expected a peft save_pretrained directory)")
    with open(config_path) as f:
        config = json.load(f)
    kind = _peft_type(config, where)
    _check_config(config, kind, where, loading=True)
    tensors = _read_weights(directory, where)
    if kind == "LORA":
        return _apply_lora(base_model, config, tensors, where)
    if "prompt_embeddings" not in tensors:
        raise ConversionError(f"{where}: the checkpoint in {directory!r} has no 'prompt_embeddings'")
    heads = {k: v for k, v in tensors.items() if k != "prompt_embeddings"}
    # peft saves the prefix its encoder computes (with prefix_projection, the MLP's output): a flat prefix.
    return _apply_prefix(base_model, config, {"prefix": tensors["prompt_embeddings"]}, heads, where)


# ----------------------------------------------------------------------------------------------------------------
# Reading the source
# ----------------------------------------------------------------------------------------------------------------


def _peft_type(config: dict, where: str) -> str:
    kind = str(config.get("peft_type", ""))
    kind = kind.rpartition(".")[2]  # "PeftType.LORA" from an enum's str
    if kind not in ("LORA", "PREFIX_TUNING"):
        raise ConversionError(f"{where}: peft_type={kind!r} is not supported; fastpeft converts LORA and PREFIX_TUNING")
    return kind


def _read_weights(directory, where: str) -> dict:
    safe = os.path.join(directory, "adapter_model.safetensors")
    if os.path.isfile(safe):
        from safetensors.torch import load_file

        return load_file(safe)
    pickled = os.path.join(directory, "adapter_model.bin")
    if os.path.isfile(pickled):
        return torch.load(pickled, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{where}: no adapter_model.safetensors or adapter_model.bin in {str(directory)!r}")


def _base_tensors(base: nn.Module, adapter: str):
    """name -> tensor of the base model as transformers names it: peft's wrappers removed (`base_layer`), and the
    active adapter's trained copy of every `modules_to_save` module in place of the original."""
    tensors, trained = {}, {}
    for named in (base.named_parameters, base.named_buffers):
        for name, tensor in named(remove_duplicate=False):
            parts = name.split(".")
            if any(part.startswith("lora_") for part in parts):
                continue  # the LoRA weights themselves
            if "modules_to_save" in parts:
                i = parts.index("modules_to_save")
                if parts[i + 1] == adapter:
                    trained[".".join(parts[:i] + parts[i + 2 :])] = tensor
                continue
            tensors[".".join(p for p in parts if p not in ("base_layer", "original_module"))] = tensor
    tensors.update(trained)
    return tensors.get


def _check_flags(config: dict, neutral: set, required: dict, where: str, what: str) -> None:
    for key, value in config.items():
        if key in neutral:
            continue
        if key in required:
            if value != required[key]:
                raise ConversionError(
                    f"{where}: {what}.{key}={value!r} is not supported (fastpeft reproduces {key}={required[key]!r} only)"
                )
            continue
        if value not in (None, False, {}, []):
            raise ConversionError(f"{where}: {what}.{key}={value!r} is not supported by fastpeft's conversion")


def _head_config(model: nn.Module, config: dict, what: str, where: str) -> bool:
    """Whether fastpeft trains the task head: peft's `modules_to_save` must be exactly the model's task head.

    peft matches `modules_to_save` names against the end of module paths, and ignores names matching nothing
    (its sequence-classification default lists both "classifier" and "score")."""
    names = config.get("modules_to_save") or []
    modules = [m for path, m in model.named_modules() if any(path == n or path.endswith("." + n) for n in names)]
    if not modules:
        return False
    saved = {id(p) for module in modules for p in module.parameters()}
    if saved != {id(p) for p in head_parameters(model)}:
        raise ConversionError(
            f"{where}: {what}.modules_to_save={names!r} is not supported: fastpeft trains the whole task head (the "
            "parameters outside the base model) or nothing besides the method"
        )
    return True


def _strip(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _copy_heads(write: Writer, heads: dict) -> None:
    """The task head peft trained (`modules_to_save`), into the model's own head."""
    for key, value in heads.items():
        write(_strip(key), value, f"the checkpoint's {key!r}")


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------


def _check_config(config: dict, kind: str, where: str, loading: bool) -> None:
    """Refuse, naming the flag and its value, every setting fastpeft does not reproduce."""
    if kind == "PREFIX_TUNING":
        _check_flags(config, _PREFIX_NEUTRAL, {}, where, "PrefixTuningConfig")
        return
    _check_flags(config, _LORA_NEUTRAL, _LORA_REQUIRED, where, "LoraConfig")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith("mica"):
        raise ConversionError(f"{where}: LoraConfig.init_lora_weights={init!r} is not supported (MiCA freezes B)")
    if loading and init not in _INIT_KEEPS_BASE:
        raise ConversionError(
            f"{where}: LoraConfig.init_lora_weights={init!r} is not supported when loading a checkpoint: that "
            "initialisation rewrites the base weights, so the adapter only fits the rewritten base model (convert the "
            "live PeftModel with fastpeft.from_peft instead)"
        )


def _apply_lora(model: nn.Module, config: dict, tensors: dict, where: str) -> nn.Module:
    arch = find_arch(model)
    pairs, heads = {}, {}
    for key, value in tensors.items():
        name = _strip(key)
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[part] = value
                break
        else:
            if "lora_" in name:
                raise ConversionError(
                    f"{where}: {key!r} is a LoRA weight fastpeft does not reproduce (LoRA on an embedding or a conv?)"
                )
            heads[key] = value
    units, weights = {}, {}
    for path, pair in pairs.items():
        found = locate(arch, model, path)
        if found is None:
            raise ConversionError(
                f"{where}: LoRA on {path!r} cannot be converted: it is not a projection inside the layers of this "
                f"{type(model).__name__} (fastpeft adapts those only; or the adapter was made for another model)"
            )
        if set(pair) != {"lora_A", "lora_B"}:
            raise ConversionError(f"{where}: LoRA on {path!r} lacks {sorted({'lora_A', 'lora_B'} - set(pair))}")
        unit = LoRAUnit(found[0], found[1], None)
        r = pair["lora_A"].shape[0]
        dropout = float(config.get("lora_dropout") or 0.0)
        units[unit] = (r, config["lora_alpha"], bool(config.get("use_rslora")), dropout)
        weights[unit] = (pair["lora_A"], pair["lora_B"])
    if not units:
        raise ConversionError(f"{where}: the adapter holds no LoRA weights")
    attn, ffn = lora_config(arch, model, units, where)
    train_head = _head_config(model, config, "LoraConfig", where)
    unified = UnifiedConfig(attn=attn, ffn=ffn, train_head=train_head)
    targets = planned_units(arch, model, unified)

    def fill(write: Writer):
        for unit, (a, b) in weights.items():
            path, role = targets[unit]
            write(f"{path}.lora_A.{role}", a, f"lora_A of {path}")
            write(f"{path}.lora_B.{role}", b, f"lora_B of {path}")
        _copy_heads(write, heads)

    return apply_with_weights(model, unified, fill, where)


# ----------------------------------------------------------------------------------------------------------------
# Prefix tuning
# ----------------------------------------------------------------------------------------------------------------


def _apply_prefix(model: nn.Module, config: dict, weights: dict, heads: dict, where: str) -> nn.Module:
    arch = find_arch(model)
    if len(arch.stacks) != 1 or (config.get("num_transformer_submodules") or 1) != 1:
        raise ConversionError(
            f"{where}: prefix tuning from peft on encoder-decoder models ({arch.name}) is not supported: peft reaches "
            "only the decoder's self-attention, where decoder layer i takes the prefix peft made for layer 2i "
            "(mod the layer count), so layers share prefixes; fastpeft keeps one prefix per attention"
        )
    model_config = model.config
    window = getattr(model_config, "sliding_window", None)
    if window is not None:
        raise ConversionError(
            f"{where}: prefix tuning with sliding_window={window} is not supported: peft's prefix sits in the KV cache, "
            "where the sliding window hides it from later tokens; fastpeft's prefix is seen by every token. The two "
            "agree only on sequences of at most sliding_window - num_virtual_tokens tokens; to convert anyway, load "
            "the model with sliding_window=None (which also lifts the window for the real tokens)"
        )
    length = config["num_virtual_tokens"]
    stack = arch.stacks[0]
    layers = len(model.base_model.get_submodule(stack.layers))
    _, kv_heads, head_dim = head_geometry(model_config, stack)
    expected = {"num_layers": layers, "num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim}
    for key, value in expected.items():
        if config.get(key) != value:
            raise ConversionError(
                f"{where}: PrefixTuningConfig.{key}={config.get(key)!r} does not fit this model, which needs {value} "
                f"({layers} layers, {kv_heads} key/value heads of size {head_dim})"
            )
    width = kv_heads * head_dim
    projection = "prefix" not in weights
    prefix = PrefixConfig(
        length=length,
        reparam_dim=config["encoder_hidden_size"] if projection else None,
        embedding_dim=width if projection and width != model_config.hidden_size else None,
        cross_attention=False,
        shift_positions=True,
    )
    train_head = _head_config(model, config, "PrefixTuningConfig", where)
    unified = UnifiedConfig(attn=prefix, train_head=train_head)

    def fill(write: Writer):
        if projection:
            for name, value in weights.items():
                write(f"{PREFIX_ATTR}.{name}", value, f"the prefix encoder's {name}")
        else:
            flat = weights["prefix"]
            rows = 2 * layers * kv_heads
            if tuple(flat.shape) != (length, rows * head_dim):
                raise ConversionError(
                    f"{where}: the prefix has shape {list(flat.shape)}, expected {[length, rows * head_dim]}"
                )
            # peft's [L, layers * 2 * Hkv * D] is fastpeft's [rows, L, D] with the position axis first.
            write(f"{PREFIX_ATTR}.prefix", flat.view(length, rows, head_dim).transpose(0, 1), "the prefix")
        _copy_heads(write, heads)

    return apply_with_weights(model, unified, fill, where)

