"""Prefix tuning: the prefixes of every attention, and how the attention reaches them.

`PrefixEncoder` holds the prefixes of all attention sites of a model, either as one plain parameter or through
the reparametrization MLP (PAPER.md section 3), which runs once per model forward: a forward pre-hook on each
entry point of the model (`EnterForward`: the model, its base model, its encoder and decoder stacks, which
`generate` calls on their own) evaluates it when the outermost one starts, and every attention reads its slice.

The attention itself becomes `fastpeft.prefix_attention` over [prefix; keys] on the queries, keys and values the
model computed, after rotary embeddings and after the KV cache update: the prefix is never rotated, never
cached, real tokens keep their positions, and with grouped-query attention there is one prefix per key/value
head. Two ways in:

- through transformers' attention interface (every supported model in 5.x; GPT-2, Llama, Mistral, Qwen2 and
  BART in 4.57): the attention module gets its own shallow copy of the config whose `_attn_implementation` is
  "fastpeft", a name registered in `AttentionInterface` that maps to `prefix_attention_interface`. The model's
  own config, and so its mask construction, is untouched.
- BERT and RoBERTa in transformers 4.57 call their attention inline: their self-attention's `forward` is
  replaced on the instance by `legacy_bert_self_attention_forward` (encoder use only).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from fastpeft.config import PrefixConfig
from fastpeft.modules._common import like
from fastpeft.ops import adapter as adapter_op
from fastpeft.ops import prefix_attention

INTERFACE_NAME = "fastpeft"


def _reparametrize(embedding, w_down, b_down, w_up, b_up) -> Tensor:
    """The MLP tanh(E W_down^T + b_down) W_up^T + b_up, [L, rows * D]: a bottleneck with tanh, added onto zero."""
    zeros = embedding.new_zeros(embedding.shape[0], w_up.shape[0])
    return adapter_op(embedding, zeros, w_down, w_up, b_down, b_up, scale=1.0, activation="tanh")


class _ReparametrizeRerunnable(torch.autograd.Function):
    """The reparametrization with a backward that may run more than once.

    With reentrant gradient checkpointing (transformers 4.57's default) every checkpointed layer runs its own
    backward pass into the shared prefix; an ordinary graph would be freed by the first one. This backward keeps
    no saved activations: it recomputes the (small) MLP, so every layer's pass adds its share to the gradients.
    """

    @staticmethod
    def forward(ctx, *inputs):
        # Parameters, kept on ctx instead of save_for_backward so that they are not released after one backward.
        ctx.inputs = inputs
        return _reparametrize(*inputs)

    @staticmethod
    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_(needed) for t, needed in zip(ctx.inputs, ctx.needs_input_grad)]
        wanted = [t for t in inputs if t.requires_grad]
        with torch.enable_grad():
            out = _reparametrize(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return tuple(next(grads) if t.requires_grad else None for t in inputs)


class Reparametrization(nn.Module):
    """The prefixes of some sites through an MLP (PAPER.md section 3): `embedding` [L, e], `down` (Linear e -> m),
    `up` (Linear m -> rows * D, output index = row * D + dim)."""

    def __init__(self, length: int, embedding_dim: int, reparam_dim: int, rows: int, head_dim: int, **factory):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(length, embedding_dim, **factory))
        self.down = nn.Linear(embedding_dim, reparam_dim, **factory)
        self.up = nn.Linear(reparam_dim, rows * head_dim, **factory)


def _compute_reparam(holder: nn.Module, rows: int, head_dim: int, checkpointing: bool) -> Tensor:
    """The prefixes an MLP holder (`PrefixEncoder` itself or a `Reparametrization`) computes, [rows, L, D]."""
    inputs = (holder.embedding, holder.down.weight, holder.down.bias, holder.up.weight, holder.up.bias)
    if checkpointing and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        out = _ReparametrizeRerunnable.apply(*inputs)
    else:
        out = _reparametrize(*inputs)
    # [L, rows * D] -> [rows, L, D], contiguous so that each site's keys and values are contiguous slices.
    return out.view(holder.embedding.shape[0], rows, head_dim).transpose(0, 1).contiguous()


class PrefixEncoder(nn.Module):
    """The prefixes of every attention site of a model.

    Layout: all prefixes form one [rows, L, D] tensor; site i owns rows [offset_i, offset_i + 2 * Hkv_i): its
    Hkv_i key heads, then its Hkv_i value heads. Sites are ordered as `fastpeft` lists them
    (`PrefixSite.index`; encoder layers first, self-attention before cross-attention).

    Parameters: `prefix` [rows, L, D] when flat (reparam_dim None, or after `eject`); otherwise `embedding`
    [L, e] (e = embedding_dim, default the hidden size), `down` (Linear e -> m) and `up` (Linear m -> rows * D,
    output index = row * D + dim). With `reparam_per_kind`, one such MLP per kind of site instead, in
    `reparams[kind]` (kinds "encoder", "decoder", "cross"), whose rows are its sites' rows in site order.
    """

    def __init__(
        self,
        config: PrefixConfig,
        hidden_size: int,
        kv_heads: list,
        head_dim: int,
        *,
        kinds: Optional[list] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.length = config.length
        self.head_dim = head_dim
        self.kv_heads = list(kv_heads)
        self.kinds = list(kinds) if kinds is not None else ["decoder"] * len(self.kv_heads)
        self.offsets = []
        rows = 0
        for heads in self.kv_heads:
            self.offsets.append(rows)
            rows += 2 * heads
        self.rows = rows
        factory = {"device": device, "dtype": dtype}
        embedding_dim = config.embedding_dim or hidden_size
        if config.reparam_dim is None:
            self.prefix = nn.Parameter(torch.randn(rows, config.length, head_dim, **factory))
        elif config.reparam_per_kind:
            self.reparams = nn.ModuleDict()
            for kind in dict.fromkeys(self.kinds):
                self.reparams[kind] = Reparametrization(
                    config.length, embedding_dim, config.reparam_dim, self.kind_rows(kind), head_dim, **factory
                )
        else:
            self.embedding = nn.Parameter(torch.randn(config.length, embedding_dim, **factory))
            self.down = nn.Linear(embedding_dim, config.reparam_dim, **factory)
            self.up = nn.Linear(config.reparam_dim, rows * head_dim, **factory)
        # The prefixes of the current forward ([rows, L, D]), set by `EnterForward`, kept after the forward so that
        # gradient checkpointing recomputes layers in backward with the same tensor.
        self.current: Optional[Tensor] = None
        self.depth = 0
        # A layer of the model whose `gradient_checkpointing` flag transformers sets (in a list: not a submodule).
        self.checkpoint_probe: list = []

    def kind_rows(self, kind: str) -> int:
        """How many rows the sites of one kind hold."""
        return sum(2 * heads for heads, k in zip(self.kv_heads, self.kinds) if k == kind)

    @property
    def flat(self) -> bool:
        return "prefix" in self._parameters

    def compute(self) -> Tensor:
        """All prefixes, [rows, L, D]."""
        if self.flat:
            return self.prefix
        probe = self.checkpoint_probe[0] if self.checkpoint_probe else None
        checkpointing = probe is not None and getattr(probe, "gradient_checkpointing", False) and self.training
        if "reparams" not in self._modules:
            return _compute_reparam(self, self.rows, self.head_dim, checkpointing)
        return self.assemble(
            {
                kind: _compute_reparam(module, self.kind_rows(kind), self.head_dim, checkpointing)
                for kind, module in self.reparams.items()
            }
        )

    def assemble(self, per_kind: dict) -> Tensor:
        """All prefixes [rows, L, D] from each kind's prefixes {kind: [kind_rows(kind), L, D]}: each site takes the
        next rows of its kind, in site order."""
        taken = dict.fromkeys(per_kind, 0)
        pieces = []
        for heads, kind in zip(self.kv_heads, self.kinds):
            pieces.append(per_kind[kind][taken[kind] : taken[kind] + 2 * heads])
            taken[kind] += 2 * heads
        return torch.cat(pieces)

    def site(self, index: int, like_tensor: Tensor) -> tuple:
        """(prefix_k, prefix_v) of site `index`, each [Hkv, L, D], in the dtype of `like_tensor`."""
        if self.flat:
            prefixes = self.prefix
        else:
            if self.current is None:  # an attention called outside any model forward
                self.current = self.compute()
            prefixes = self.current
        start, heads = self.offsets[index], self.kv_heads[index]
        keys = prefixes[start : start + heads]
        values = prefixes[start + heads : start + 2 * heads]
        return like(keys, like_tensor), like(values, like_tensor)

    @torch.no_grad()
    def set_site(self, index: int, keys: Tensor, values: Tensor) -> None:
        """Set the prefix of site `index` (flat form only): keys and values [Hkv, L, D]."""
        if not self.flat:
            raise RuntimeError("PrefixEncoder.set_site: the prefix is reparametrized; call fastpeft.eject_prefix first")
        start, heads = self.offsets[index], self.kv_heads[index]
        expected = (heads, self.length, self.head_dim)
        for name, t in (("keys", keys), ("values", values)):
            if tuple(t.shape) != expected:
                raise ValueError(f"PrefixEncoder.set_site: '{name}' must be [Hkv, L, D] = {expected}, got {tuple(t.shape)}")
        self.prefix[start : start + heads].copy_(keys)
        self.prefix[start + heads : start + 2 * heads].copy_(values)

    @torch.no_grad()
    def eject(self) -> None:
        """Replace the reparametrization by the prefixes it computes (a plain parameter)."""
        if self.flat:
            return
        reference = next(self.parameters())
        requires_grad = reference.requires_grad
        if reference.device.type == "meta":  # no values to compute (parameter counting)
            prefix = reference.new_empty(self.rows, self.length, self.head_dim)
        else:
            prefix = self.compute().detach().clone()
        if "reparams" in self._modules:
            del self.reparams
        else:
            del self.embedding, self.down, self.up
        self.prefix = nn.Parameter(prefix, requires_grad=requires_grad)
        self.current = None

    def extra_repr(self) -> str:
        return f"sites={len(self.kv_heads)}, length={self.length}, head_dim={self.head_dim}, flat={self.flat}"


class EnterForward:
    """Forward pre-hook on each entry point of the model: evaluate the prefixes when the outermost forward starts."""

    def __init__(self, encoder: PrefixEncoder):
        self.encoder = encoder

    def __call__(self, module, args):
        encoder = self.encoder
        if encoder.depth == 0 and not encoder.flat:
            encoder.current = encoder.compute()
        encoder.depth += 1
        return None


class ExitForward:
    """Forward hook (always called, also on exceptions) paired with `EnterForward`."""

    def __init__(self, encoder: PrefixEncoder):
        self.encoder = encoder

    def __call__(self, module, args, output):
        self.encoder.depth = max(self.encoder.depth - 1, 0)
        return None


class ShiftPositions:
    """Forward pre-hook on the module the token positions enter (`architectures.Positions`): real tokens take
    positions shifted by the prefix length, as when the prefix occupies the first positions of the KV cache (peft).

    Explicit position ids are shifted; when there are none and the module derives them from a past length
    (BERT / RoBERTa embeddings), that length is increased instead, so that the model's own rule (RoBERTa keeps
    padding tokens at its padding position) applies unchanged.
    """

    def __init__(self, length: int, positions):
        self.length = length
        self.name, self.position = positions.arg
        self.past_length = positions.past_length

    def __call__(self, module, args, kwargs):
        if self.name in kwargs and kwargs[self.name] is not None:
            kwargs[self.name] = kwargs[self.name] + self.length
            return args, kwargs
        if len(args) > self.position and args[self.position] is not None:
            args = list(args)
            args[self.position] = args[self.position] + self.length
            return tuple(args), kwargs
        if self.past_length is None:
            raise RuntimeError(f"fastpeft: {type(module).__name__} was called without {self.name!r} to shift")
        kwargs[self.past_length] = kwargs.get(self.past_length, 0) + self.length
        return args, kwargs


class PrefixSite:
    """What an attention module with a prefix needs: its prefix (site `index` of `encoder`) and its score scale."""

    def __init__(self, encoder: PrefixEncoder, index: int, scaling: float, original_config=None):
        self.encoder = encoder
        self.index = index
        self.scaling = scaling
        # The config object the attention module had before it got its own copy (restored by fastpeft.remove).
        self.original_config = original_config

    def prefixes(self, like_tensor: Tensor) -> tuple:
        return self.encoder.site(self.index, like_tensor)


def default_scaling(module: nn.Module, head_dim: int) -> float:
    """The attention's score scale when the model does not pass one (GPT-2 in transformers 4.57)."""
    scaling = getattr(module, "scaling", None)
    if scaling is not None:
        return float(scaling)
    scaling = 1.0 / math.sqrt(head_dim) if getattr(module, "scale_attn_weights", True) else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scaling /= float(module.layer_idx + 1)
    return scaling


def prefix_attention_interface(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """An `AttentionInterface` function: attention over [prefix; keys], with transformers' mask conventions.

    `attention_mask` is what the model built for its own implementation (eager: additive float; sdpa: boolean,
    or None when plain causal). As in transformers' sdpa path, no mask means causal for causal modules, aligned
    top-left when there are more keys than queries (prefill into an empty static cache).
    """
    site: PrefixSite = module.fastpeft_prefix_site
    if kwargs.get("head_mask") is not None:
        raise NotImplementedError("fastpeft: prefix tuning does not support 'head_mask'")
    prefix_k, prefix_v = site.prefixes(query)
    if scaling is None:
        scaling = site.scaling
    causal = False
    if attention_mask is None:
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        causal = bool(is_causal) and query.shape[2] > 1
        if causal and key.shape[2] > query.shape[2]:
            key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    else:
        if attention_mask.dim() != 4:
            raise ValueError(
                "fastpeft: prefix tuning needs a 4-D attention mask (attn_implementation 'eager' or 'sdpa'), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask[:, :, :, : key.shape[2]]
    out = prefix_attention(
        query, key, value, prefix_k, prefix_v, causal=causal, attn_mask=attention_mask, scale=scaling, dropout_p=dropout
    )
    return out.transpose(1, 2).contiguous(), None


def register_interface() -> None:
    """Register "fastpeft" in transformers' attention interface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(INTERFACE_NAME, prefix_attention_interface)


def legacy_bert_self_attention_forward(
    self,
    hidden_states: Tensor,
    attention_mask: Optional[Tensor] = None,
    head_mask: Optional[Tensor] = None,
    encoder_hidden_states: Optional[Tensor] = None,
    past_key_values=None,
    output_attentions: bool = False,
    cache_position=None,
    **kwargs,
):
    """BERT / RoBERTa self-attention (transformers 4.57, encoder use) over [prefix; keys].

    Bound to the self-attention instance in place of its forward; returns (context, None) like the sdpa class.
    The mask is the model's additive float mask over the keys (or None).
    """
    if encoder_hidden_states is not None or past_key_values is not None or kwargs.get("past_key_value") is not None:
        raise NotImplementedError("fastpeft: prefix tuning on BERT / RoBERTa supports encoder use only")
    if head_mask is not None:
        raise NotImplementedError("fastpeft: prefix tuning does not support 'head_mask'")
    batch, length, _ = hidden_states.shape
    shape = (batch, length, self.num_attention_heads, self.attention_head_size)
    query = self.query(hidden_states).view(shape).transpose(1, 2)
    key = self.key(hidden_states).view(shape).transpose(1, 2)
    value = self.value(hidden_states).view(shape).transpose(1, 2)
    site: PrefixSite = self.fastpeft_prefix_site
    prefix_k, prefix_v = site.prefixes(query)
    out = prefix_attention(
        query,
        key,
        value,
        prefix_k,
        prefix_v,
        causal=False,
        attn_mask=attention_mask,
        scale=site.scaling,
        dropout_p=self.dropout.p if self.training else 0.0,
    )
    return out.transpose(1, 2).reshape(batch, length, self.all_head_size), None
