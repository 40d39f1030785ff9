"""Method configs, presets and their JSON form.

Every method of the unified view is one of three configs, placed at a site of each Transformer layer:

- `AdapterConfig`: a bottleneck adapter (Houlsby, Pfeiffer, parallel, scaled parallel) at the attention or FFN
  sublayer, sequential (reads the sublayer output) or parallel (reads the sublayer input).
- `LoRAConfig`: low-rank updates on projections named by role (q, k, v, o, ffn_in, ffn_out).
- `PrefixConfig`: learned key/value prefixes at every attention (self and cross).

`UnifiedConfig(attn=..., ffn=...)` holds one method per site; every other config is turned into one
(`as_unified`). Presets (`get_config`) carry the papers' defaults (PAPER.md section 4).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from fastpeft.reference import ACTIVATIONS

INSERTIONS = ("parallel", "sequential")
SITES = ("attn", "ffn")
ADAPTER_INITS = ("lora", "bert", "houlsby")
DROPOUT_POSITIONS = ("input", "output")
ATTN_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("ffn_in", "ffn_out")
ROLES = ATTN_ROLES + FFN_ROLES


def _fail(cls: str, name: str, expected: str, value) -> None:
    raise ValueError(f"{cls}: '{name}' must be {expected}, got {value!r}")


def _check_int(cls: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(cls, name, f"an integer >= {minimum}", value)


def _check_dropout(cls: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        _fail(cls, "dropout", "a float in [0, 1)", value)


def _layers_tuple(cls: str, layers) -> Optional[tuple]:
    """None (every layer) or a sorted tuple of distinct layer indices."""
    if layers is None:
        return None
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        _fail(cls, "layers", "None or a sequence of layer indices", layers)
    for index in layers:
        _check_int(cls, "layers", index, 0)
    return tuple(sorted(set(layers)))


@dataclass(frozen=True)
class AdapterConfig:
    """A bottleneck adapter: y = h + s * (act(x W_down^T + b_down) W_up^T + b_up).

    Args:
        r: bottleneck size.
        activation: one of "identity", "relu", "gelu", "gelu_tanh", "silu", "tanh".
        insertion: "parallel" (x is the sublayer's input, the change is added to its output) or "sequential"
            (x is the sublayer's output projection itself: Houlsby / Pfeiffer).
        site: "ffn" or "attn" (the self-attention sublayer). Inside a `UnifiedConfig` the slot decides.
        scale: s, a float, or "learned" (a trained scalar starting at 1.0).
        init: "lora" (W_down Kaiming-uniform, W_up = 0: exact identity), "bert" (both N(0, 0.02)) or
            "houlsby" (both N(0, 0.01) truncated at 2 std); biases start at zero.
        dropout: dropout while training, on the adapter's input (or output: `dropout_position`).
        layers: layer indices to adapt (encoder layers first, then decoder layers); None for all.
        original_ln_before: sequential insertion in post-LN models (BERT, RoBERTa, BART) only: the adapter reads
            LayerNorm(h + residual) through the block's own LayerNorm instead of h, and still adds onto h
            (AdapterHub's `seq_bn` / Pfeiffer default; the block then applies its LayerNorm as usual).
        residual_input: the adapter reads the block's residual stream (the input of the LayerNorm in front of the
            sublayer in pre-LN models; the sublayer's input in post-LN models). Parallel insertion: x = residual
            instead of the sublayer's normalised input (AdapterHub's `par_bn`). Sequential insertion: x = h +
            residual, and the adapter still adds onto h (AdapterHub's `seq_bn` on pre-LN models, which have no
            LayerNorm after the sublayer to apply; see `original_ln_before` for post-LN models).
        dropout_position: where `dropout` applies while training: "input" (on x) or "output" (on the scaled
            change s * Delta h, as AdapterHub does). The same in eval.
    """

    r: int
    activation: str = "relu"
    insertion: str = "parallel"
    site: str = "ffn"
    scale: Union[float, str] = 1.0
    init: str = "lora"
    dropout: float = 0.0
    layers: Optional[tuple] = None
    original_ln_before: bool = False
    residual_input: bool = False
    dropout_position: str = "input"

    def __post_init__(self):
        cls = type(self).__name__
        _check_int(cls, "r", self.r, 1)
        if self.activation not in ACTIVATIONS:
            _fail(cls, "activation", f"one of {ACTIVATIONS}", self.activation)
        if self.insertion not in INSERTIONS:
            _fail(cls, "insertion", f"one of {INSERTIONS}", self.insertion)
        if self.site not in SITES:
            _fail(cls, "site", f"one of {SITES}", self.site)
        if self.scale != "learned" and (isinstance(self.scale, bool) or not isinstance(self.scale, (int, float))):
            _fail(cls, "scale", "a float or 'learned'", self.scale)
        if self.init not in ADAPTER_INITS:
            _fail(cls, "init", f"one of {ADAPTER_INITS}", self.init)
        _check_dropout(cls, self.dropout)
        if not isinstance(self.original_ln_before, bool):
            _fail(cls, "original_ln_before", "a bool", self.original_ln_before)
        if self.original_ln_before and self.insertion != "sequential":
            _fail(cls, "original_ln_before", "False with parallel insertion (it is a sequential option)", True)
        if not isinstance(self.residual_input, bool):
            _fail(cls, "residual_input", "a bool", self.residual_input)
        if self.residual_input and self.original_ln_before:
            _fail(cls, "residual_input", "False with original_ln_before (that already reads h + residual)", True)
        if self.dropout_position not in DROPOUT_POSITIONS:
            _fail(cls, "dropout_position", f"one of {DROPOUT_POSITIONS}", self.dropout_position)
        if isinstance(self.scale, int):
            object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "layers", _layers_tuple(cls, self.layers))


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA: W x + (alpha / r) * B A x on the projections named by `targets`.

    Args:
        r: rank. alpha: scaling numerator (s = alpha / r).
        dropout: dropout on the LoRA input while training.
        targets: roles among "q", "k", "v", "o" (every attention, self and cross) and "ffn_in", "ffn_out"
            (gated FFNs: ffn_in is both the gate and the up projection). Fused projections such as GPT-2's
            `c_attn` get one LoRA per role on that role's slice of the output.
        layers: layer indices to adapt (encoder layers first, then decoder layers); None for all.
        cross_attention: also adapt the cross-attention projections of encoder-decoder models.
        rslora: scale by alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA, peft's `use_rslora`).
        fuse_slices: on a fused projection whose slices are all targeted (GPT-2's `c_attn` with q, k and v), one
            LoRA over its whole output, A shared by the slices (peft's form; the role is named "q_k_v"), instead
            of one LoRA per slice (AdapterHub's form).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple = ("q", "v")
    layers: Optional[tuple] = None
    cross_attention: bool = True
    rslora: bool = False
    fuse_slices: bool = False

    def __post_init__(self):
        cls = type(self).__name__
        _check_int(cls, "r", self.r, 1)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            _fail(cls, "alpha", "a positive number", self.alpha)
        _check_dropout(cls, self.dropout)
        targets = (self.targets,) if isinstance(self.targets, str) else self.targets
        if not isinstance(targets, Sequence) or not targets or any(t not in ROLES for t in targets):
            _fail(cls, "targets", f"a non-empty sequence of roles from {ROLES}", self.targets)
        if len(set(targets)) != len(targets):
            _fail(cls, "targets", "roles without repetition", self.targets)
        for name in ("cross_attention", "rslora", "fuse_slices"):
            if not isinstance(getattr(self, name), bool):
                _fail(cls, name, "a bool", getattr(self, name))
        object.__setattr__(self, "targets", tuple(targets))
        object.__setattr__(self, "layers", _layers_tuple(cls, self.layers))

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


@dataclass(frozen=True)
class PrefixConfig:
    """Prefix tuning: `length` learned key/value vectors prepended at every attention, per layer and key/value head.

    Args:
        length: prefix length l.
        reparam_dim: width m of the reparametrization MLP (Linear(d, m) -> tanh -> Linear(m, ...)), evaluated
            once per forward; None keeps the prefix as a plain parameter (the form `eject_prefix` leaves).
        layers: layer indices to adapt (encoder layers first, then decoder layers); None for all.
        cross_attention: also prefix the cross-attention of encoder-decoder models.
        embedding_dim: width of the reparametrization's input embedding; None for the model's hidden size
            (peft uses the key/value width, which differs with grouped-query attention).
        reparam_per_kind: one reparametrization MLP per kind of attention (encoder self-attention, decoder
            self-attention, cross-attention), as AdapterHub does, instead of one for the whole model.
        shift_positions: real tokens take positions `length`, `length` + 1, ... as if the prefix occupied the
            first positions of the sequence (peft's convention: its prefix sits in the KV cache). The prefix itself
            still has no position (it is never rotated).
    """

    length: int = 30
    reparam_dim: Optional[int] = 512
    layers: Optional[tuple] = None
    cross_attention: bool = True
    embedding_dim: Optional[int] = None
    reparam_per_kind: bool = False
    shift_positions: bool = False

    def __post_init__(self):
        cls = type(self).__name__
        _check_int(cls, "length", self.length, 1)
        if self.reparam_dim is not None:
            _check_int(cls, "reparam_dim", self.reparam_dim, 1)
        for name in ("cross_attention", "reparam_per_kind", "shift_positions"):
            if not isinstance(getattr(self, name), bool):
                _fail(cls, name, "a bool", getattr(self, name))
        if self.embedding_dim is not None:
            _check_int(cls, "embedding_dim", self.embedding_dim, 1)
        if self.reparam_dim is None and (self.embedding_dim is not None or self.reparam_per_kind):
            name = "embedding_dim" if self.embedding_dim is not None else "reparam_per_kind"
            _fail(cls, name, "unset without a reparametrization (reparam_dim is None)", getattr(self, name))
        object.__setattr__(self, "layers", _layers_tuple(cls, self.layers))


MethodConfig = Union[AdapterConfig, LoRAConfig, PrefixConfig]
_SITE_METHODS = {"attn": (AdapterConfig, LoRAConfig, PrefixConfig), "ffn": (AdapterConfig, LoRAConfig)}


@dataclass(frozen=True)
class UnifiedConfig:
    """One method per site of every layer, plus what else is trained.

    Args:
        attn: the method at the attention sublayer: `AdapterConfig`, `LoRAConfig` (roles q, k, v, o) or
            `PrefixConfig`; None for nothing.
        ffn: the method at the FFN sublayer: `AdapterConfig` or `LoRAConfig` (roles ffn_in, ffn_out); None.
        train_layernorm: also train every LayerNorm / RMSNorm of the model (Houlsby).
        train_head: also train the task head (the parameters outside the base model, except an output
            embedding / LM head, which is pretrained).
    """

    attn: Optional[MethodConfig] = None
    ffn: Optional[MethodConfig] = None
    train_layernorm: bool = False
    train_head: bool = True

    def __post_init__(self):
        cls = type(self).__name__
        for site in SITES:
            method = getattr(self, site)
            if method is None:
                continue
            allowed = _SITE_METHODS[site]
            if not isinstance(method, allowed):
                _fail(cls, site, "None or one of " + ", ".join(c.__name__ for c in allowed), method)
            if isinstance(method, AdapterConfig) and method.site != site:
                object.__setattr__(self, site, dataclasses.replace(method, site=site))
            if isinstance(method, LoRAConfig):
                roles = ATTN_ROLES if site == "attn" else FFN_ROLES
                stray = [t for t in method.targets if t not in roles]
                if stray:
                    _fail(cls, site, f"a LoRAConfig whose targets are among {roles} at the {site} site", method)
        for name in ("train_layernorm", "train_head"):
            if not isinstance(getattr(self, name), bool):
                _fail(cls, name, "a bool", getattr(self, name))
        if self.attn is None and self.ffn is None:
            raise ValueError(f"{cls}: at least one of 'attn' and 'ffn' must be set")

    def methods(self) -> list:
        """[(site, method config)] for the sites that are set."""
        return [(site, getattr(self, site)) for site in SITES if getattr(self, site) is not None]


# ----------------------------------------------------------------------------------------------------------------
# Presets (PAPER.md sections 2 and 4)
# ----------------------------------------------------------------------------------------------------------------

PRESETS = {
    # Houlsby et al. 2019: sequential adapters after both sublayers, GELU as in their code, near-identity init,
    # LayerNorms trained.
    "houlsby": UnifiedConfig(
        attn=AdapterConfig(r=64, activation="gelu", insertion="sequential", site="attn", init="houlsby"),
        ffn=AdapterConfig(r=64, activation="gelu", insertion="sequential", site="ffn", init="houlsby"),
        train_layernorm=True,
    ),
    # Pfeiffer et al. 2021: one sequential adapter after the FFN.
    "pfeiffer": UnifiedConfig(ffn=AdapterConfig(r=64, activation="relu", insertion="sequential", init="bert")),
    # He et al. 2022: parallel adapter at the FFN (r = 512 as in MAM), simple add and scaled add (s = 4).
    "parallel": UnifiedConfig(ffn=AdapterConfig(r=512, activation="relu", insertion="parallel", init="lora")),
    "scaled_parallel": UnifiedConfig(
        ffn=AdapterConfig(r=512, activation="relu", insertion="parallel", scale=4.0, init="lora")
    ),
    "lora": UnifiedConfig(attn=LoRAConfig(r=8, alpha=16, targets=("q", "v"))),
    # Prefix-only runs use l = 200 (PAPER.md section 4).
    "prefix": UnifiedConfig(attn=PrefixConfig(length=200, reparam_dim=512)),
    # MAM: prefix l = 30 at every attention + scaled parallel adapter r = 512, s = 4 at every FFN.
    "mam": UnifiedConfig(
        attn=PrefixConfig(length=30, reparam_dim=512),
        ffn=AdapterConfig(r=512, activation="relu", insertion="parallel", scale=4.0, init="lora"),
    ),
}


def get_config(name: str, **overrides) -> UnifiedConfig:
    """The preset `name` with `overrides` applied.

    An override naming a `UnifiedConfig` field (attn, ffn, train_layernorm, train_head) replaces it; any other
    override is applied to every method config of the preset that has that field, e.g.
    `get_config("mam", r=16, length=16)`.
    """
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"fastpeft.get_config: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    config = PRESETS[name]
    top = {f.name for f in dataclasses.fields(UnifiedConfig)}
    top_overrides = {k: v for k, v in overrides.items() if k in top}
    method_overrides = {k: v for k, v in overrides.items() if k not in top}
    for key, value in method_overrides.items():
        touched = False
        for site, method in config.methods():
            if key in {f.name for f in dataclasses.fields(method)}:
                config = dataclasses.replace(config, **{site: dataclasses.replace(method, **{key: value})})
                touched = True
        if not touched:
            valid = sorted(top | {f.name for _, m in config.methods() for f in dataclasses.fields(m)})
            raise ValueError(f"fastpeft.get_config: preset {name!r} has no field {key!r}; valid overrides: {valid}")
    return dataclasses.replace(config, **top_overrides) if top_overrides else config


def as_unified(config) -> UnifiedConfig:
    """Any config or preset name as a `UnifiedConfig`.

    A lone `AdapterConfig` goes to its `site`; a lone `LoRAConfig` whose targets span both sites is split into an
    attention part and an FFN part with the same rank and alpha; a `PrefixConfig` goes to the attention site.
    """
    if isinstance(config, str):
        return get_config(config)
    if isinstance(config, UnifiedConfig):
        return config
    if isinstance(config, AdapterConfig):
        return UnifiedConfig(**{config.site: config})
    if isinstance(config, PrefixConfig):
        return UnifiedConfig(attn=config)
    if isinstance(config, LoRAConfig):
        attn = [t for t in config.targets if t in ATTN_ROLES]
        ffn = [t for t in config.targets if t in FFN_ROLES]
        return UnifiedConfig(
            attn=dataclasses.replace(config, targets=tuple(attn)) if attn else None,
            ffn=dataclasses.replace(config, targets=tuple(ffn)) if ffn else None,
        )
    raise TypeError(
        "fastpeft: 'config' must be a preset name, UnifiedConfig, AdapterConfig, LoRAConfig or PrefixConfig, "
        f"got {type(config).__name__}"
    )


# ----------------------------------------------------------------------------------------------------------------
# JSON form
# ----------------------------------------------------------------------------------------------------------------

_METHOD_TYPES = {cls.__name__: cls for cls in (AdapterConfig, LoRAConfig, PrefixConfig)}


def _method_to_dict(method) -> Optional[dict]:
    if method is None:
        return None
    data = {"type": type(method).__name__}
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        data[f.name] = list(value) if isinstance(value, tuple) else value
    return data


def _method_from_dict(data, where: str):
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("type") not in _METHOD_TYPES:
        raise ValueError(f"{where}: expected an object with 'type' one of {sorted(_METHOD_TYPES)}, got {data!r}")
    cls = _METHOD_TYPES[data["type"]]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields - {"type"})
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(fields)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "type"}
    return cls(**kwargs)


def config_to_dict(config: UnifiedConfig) -> dict:
    return {
        "attn": _method_to_dict(config.attn),
        "ffn": _method_to_dict(config.ffn),
        "train_layernorm": config.train_layernorm,
        "train_head": config.train_head,
    }


def config_from_dict(data, where: str = "config") -> UnifiedConfig:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {"attn", "ffn", "train_layernorm", "train_head"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown UnifiedConfig field(s) {unknown}; known: {sorted(known)}")
    return UnifiedConfig(
        attn=_method_from_dict(data.get("attn"), f"{where}.attn"),
        ffn=_method_from_dict(data.get("ffn"), f"{where}.ffn"),
        train_layernorm=data.get("train_layernorm", False),
        train_head=data.get("train_head", True),
    )
