"""Where each method sits, per architecture: small declarative tables, no code.

Paths are module paths relative to a Transformer layer (or, for `stacks` and `embeddings`, to the base model,
`model.base_model`). The tables hold for transformers 4.57 and 5.x alike: the module trees are the same; how the
attention is reached differs (see `fastpeft.modules.prefix`).

Sites of one layer (PAPER.md section 2):

- `attn_adapter` / `ffn_adapter`: `out` is the sublayer's output projection. A sequential adapter reads and
  replaces its output (before dropout, residual and LayerNorm); a parallel adapter reads the sublayer's input,
  taken from argument `x_arg` (name, position) of module `x_from`, and adds to that output.
- `q`, `k`, `v`, `o`, `ffn_in`, `ffn_out`: the projections LoRA targets; a `Proj` with `part` set is one slice of
  a fused projection (GPT-2's `c_attn` holds q, k and v).
- `self_attention` / `cross_attention`: the attention modules that get a prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Proj:
    """A projection: module `path`; for a fused projection, slice `part` of `parts` equal slices of the output."""

    path: str
    part: Optional[int] = None
    parts: int = 1


@dataclass(frozen=True)
class AdapterSite:
    out: str  # module whose output the adapter changes (the sublayer's output projection)
    x_from: str  # module whose input is the sublayer's input (parallel insertion)
    x_arg: tuple  # (argument name, position) of that input
    # Post-LN models: the LayerNorm the block applies to (sublayer output + residual), the residual being the
    # sublayer input above. None in pre-LN models.
    post_norm: Optional[str] = None
    # Pre-LN models: (module, argument name, position) whose input is the block's residual stream, the input of
    # the LayerNorm in front of the sublayer. None in post-LN models, where the residual is the sublayer input.
    residual_from: Optional[tuple] = None


@dataclass(frozen=True)
class Attention:
    module: str
    q: tuple
    k: tuple
    v: tuple
    o: tuple


@dataclass(frozen=True)
class Positions:
    """Where the token positions enter the model (`PrefixConfig.shift_positions`): module `module` (relative to the
    base model) receives the position ids as argument `arg` (name, position), or, when the caller passes none, derives
    them itself from argument `past_length` (the number of cached positions), if it has one."""

    module: str
    arg: tuple
    past_length: Optional[str] = None


@dataclass(frozen=True)
class Stack:
    """One stack of layers (an encoder or a decoder)."""

    name: str
    layers: str  # the ModuleList of layers, relative to the base model
    self_attention: Attention
    cross_attention: Optional[Attention]
    ffn_in: tuple
    ffn_out: tuple
    attn_adapter: AdapterSite
    ffn_adapter: AdapterSite
    heads: str  # config attribute: query heads
    kv_heads: Optional[str] = None  # config attribute: key/value heads (None: same as heads)


@dataclass(frozen=True)
class Arch:
    name: str
    model_types: tuple  # config.model_type values
    stacks: tuple
    embeddings: tuple  # token embedding modules, relative to the base model
    # The attention implementation before transformers routed it through `ALL_ATTENTION_FUNCTIONS`
    # (BERT and RoBERTa in 4.57): the prefix then replaces the self-attention's forward (`modules.prefix`).
    legacy_attention: Optional[str] = None
    positions: Optional[Positions] = None


def _mha(module: str, q: str, k: str, v: str, o: str) -> Attention:
    return Attention(module, (Proj(q),), (Proj(k),), (Proj(v),), (Proj(o),))


_BERT_STACK = Stack(
    name="encoder",
    layers="encoder.layer",
    self_attention=_mha(
        "attention.self", "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"
    ),
    cross_attention=None,
    ffn_in=(Proj("intermediate.dense"),),
    ffn_out=(Proj("output.dense"),),
    # BertSelfOutput / BertOutput receive (sublayer output, sublayer input) and apply dropout-residual-LayerNorm.
    attn_adapter=AdapterSite(
        out="attention.output.dense",
        x_from="attention.output",
        x_arg=("input_tensor", 1),
        post_norm="attention.output.LayerNorm",
    ),
    ffn_adapter=AdapterSite(
        out="output.dense", x_from="output", x_arg=("input_tensor", 1), post_norm="output.LayerNorm"
    ),
    heads="num_attention_heads",
)

# BertEmbeddings / RobertaEmbeddings take explicit position ids, or derive them from `past_key_values_length`
# (RoBERTa keeps padding tokens at its padding position).
_BERT_POSITIONS = Positions("embeddings", ("position_ids", 2), past_length="past_key_values_length")
BERT = Arch(
    "bert", ("bert",), (_BERT_STACK,), embeddings=("embeddings",), legacy_attention="bert", positions=_BERT_POSITIONS
)
ROBERTA = Arch(
    "roberta",
    ("roberta",),
    (_BERT_STACK,),
    embeddings=("embeddings",),
    legacy_attention="bert",
    positions=_BERT_POSITIONS,
)

GPT2 = Arch(
    "gpt2",
    ("gpt2",),
    (
        Stack(
            name="decoder",
            layers="h",
            self_attention=Attention(
                "attn",
                q=(Proj("attn.c_attn", 0, 3),),
                k=(Proj("attn.c_attn", 1, 3),),
                v=(Proj("attn.c_attn", 2, 3),),
                o=(Proj("attn.c_proj"),),
            ),
            cross_attention=None,
            ffn_in=(Proj("mlp.c_fc"),),
            ffn_out=(Proj("mlp.c_proj"),),
            attn_adapter=AdapterSite(
                out="attn.c_proj", x_from="attn", x_arg=("hidden_states", 0), residual_from=("ln_1", "input", 0)
            ),
            ffn_adapter=AdapterSite(
                out="mlp.c_proj", x_from="mlp", x_arg=("hidden_states", 0), residual_from=("ln_2", "input", 0)
            ),
            heads="num_attention_heads",
        ),
    ),
    embeddings=("wte",),
    positions=Positions("wpe", ("input", 0)),  # the position embedding table
)

LLAMA = Arch(
    "llama",
    ("llama", "mistral", "qwen2"),
    (
        Stack(
            name="decoder",
            layers="layers",
            self_attention=_mha(
                "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
            ),
            cross_attention=None,
            ffn_in=(Proj("mlp.gate_proj"), Proj("mlp.up_proj")),
            ffn_out=(Proj("mlp.down_proj"),),
            attn_adapter=AdapterSite(
                out="self_attn.o_proj",
                x_from="self_attn",
                x_arg=("hidden_states", 0),
                residual_from=("input_layernorm", "hidden_states", 0),
            ),
            ffn_adapter=AdapterSite(
                out="mlp.down_proj",
                x_from="mlp",
                x_arg=("x", 0),
                residual_from=("post_attention_layernorm", "hidden_states", 0),
            ),
            heads="num_attention_heads",
            kv_heads="num_key_value_heads",
        ),
    ),
    embeddings=("embed_tokens",),
    positions=Positions("rotary_emb", ("position_ids", 1)),  # the rotary embedding's cos / sin
)


def _bart_stack(name: str, heads: str, cross: bool, post_ln: bool) -> Stack:
    # BART normalises after each sublayer (post-LN), mBART before (pre-LN).
    attn_norm = "self_attn_layer_norm" if post_ln else None
    ffn_norm = "final_layer_norm" if post_ln else None
    # Pre-LN (mBART): the residual stream is what enters the LayerNorm in front of each sublayer.
    attn_residual = None if post_ln else ("self_attn_layer_norm", "input", 0)
    ffn_residual = None if post_ln else ("final_layer_norm", "input", 0)
    return Stack(
        name=name,
        layers=f"{name}.layers",
        self_attention=_mha("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
        cross_attention=(
            _mha(
                "encoder_attn",
                "encoder_attn.q_proj",
                "encoder_attn.k_proj",
                "encoder_attn.v_proj",
                "encoder_attn.out_proj",
            )
            if cross
            else None
        ),
        ffn_in=(Proj("fc1"),),
        ffn_out=(Proj("fc2"),),
        attn_adapter=AdapterSite(
            out="self_attn.out_proj",
            x_from="self_attn",
            x_arg=("hidden_states", 0),
            post_norm=attn_norm,
            residual_from=attn_residual,
        ),
        ffn_adapter=AdapterSite(
            out="fc2", x_from="fc1", x_arg=("input", 0), post_norm=ffn_norm, residual_from=ffn_residual
        ),
        heads=heads,
    )


def _bart(name: str, model_types: tuple, post_ln: bool) -> Arch:
    return Arch(
        name,
        model_types,
        (
            _bart_stack("encoder", "encoder_attention_heads", cross=False, post_ln=post_ln),
            _bart_stack("decoder", "decoder_attention_heads", cross=True, post_ln=post_ln),
        ),
        embeddings=("encoder.embed_tokens", "decoder.embed_tokens"),
    )


BART = _bart("bart", ("bart",), post_ln=True)
MBART = _bart("mbart", ("mbart",), post_ln=False)

ARCHITECTURES = (BERT, ROBERTA, GPT2, LLAMA, BART, MBART)
SUPPORTED_MODEL_TYPES = tuple(t for arch in ARCHITECTURES for t in arch.model_types)


def find_arch(model) -> Arch:
    """The table for `model` (by `model.config.model_type`), or a clear error naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    raise ValueError(
        f"fastpeft.apply: unsupported architecture {model_type!r} ({type(model).__name__}); "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )
