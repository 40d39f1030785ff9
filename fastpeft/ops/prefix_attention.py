"""`fastpeft.prefix_attention`: attention over [prefix; keys] as the gated merge of two attention states.

Custom ops (one node each for torch.compile and CUDA graphs):

- `fastpeft::prefix_attention_fwd(q, k, v, prefix_k, prefix_v, attn_mask?, causal, scale) -> (out, lse)`:
  out [B, Hq, T, D] contiguous in q's dtype; lse [B, Hq, T] contiguous, the merged natural-log log-sum-exp, float32
  (float64 for float64 inputs).
- `fastpeft::prefix_attention_bwd(dout, q, k, v, prefix_k, prefix_v, attn_mask?, out, lse, causal, scale, needs)`
  -> (dq, dk, dv, dprefix_k, dprefix_v), each only when needed (an empty tensor otherwise).

Saved for backward: the inputs, out and lse. The attention mask receives no gradient.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastpeft import reference
from fastpeft._extension import kernels_usable
from fastpeft._notice import notice_once
from fastpeft.ops import _prefix_cuda
from fastpeft.ops._checks import autocast_inputs, check_same_dtype_and_device, check_tensor

OP = "fastpeft.prefix_attention"


@torch.library.custom_op("fastpeft::prefix_attention_fwd", mutates_args=())
def prefix_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    attn_mask: Optional[Tensor],
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    args = (q, k, v, prefix_k, prefix_v, attn_mask, causal, scale)
    if kernels_usable(q.device):
        return _prefix_cuda.forward(*args)
    return reference.prefix_attention_forward(*args)


@prefix_attention_fwd.register_fake
def _prefix_attention_fwd_fake(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale):
    lse_dtype = reference.compute_dtype(q.dtype)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("fastpeft::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    attn_mask: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    causal: bool,
    scale: float,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale)
    if kernels_usable(q.device):
        grads = _prefix_cuda.backward(*args, needs)
    else:
        grads = reference.prefix_attention_backward(*args)
    # Outputs must never alias each other or an input: drop the unneeded ones as fresh empty tensors.
    return tuple(g if needed else g.new_empty(0) for g, needed in zip(grads, needs))


@prefix_attention_bwd.register_fake
def _prefix_attention_bwd_fake(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale, needs):
    return tuple(
        t.new_empty(t.shape if needed else (0,)) for t, needed in zip((q, k, v, prefix_k, prefix_v), needs)
    )


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, attn_mask, causal, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, attn_mask, out, lse)
    ctx.causal = causal
    ctx.scale = scale


def _backward(ctx, dout, _dlse):
    q, k, v, prefix_k, prefix_v, attn_mask, out, lse = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    if not any(needs):
        return (None,) * 8
    grads = prefix_attention_bwd(
        dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, ctx.causal, ctx.scale, needs
    )
    return tuple(g if needed else None for g, needed in zip(grads, needs)) + (None, None, None)


prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    *,
    causal: bool = False,
    attn_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention of q over the concatenation [prefix_k; k], [prefix_v; v], without concatenating anything.

    Computed as the gated merge of the main attention and the prefix attention (PAPER.md section 3):
    O = O_main + sigmoid(L_pre - L_main) * (O_pre - O_main).

    Args:
        q: [B, Hq, T, D]. k, v: [B, Hkv, S, D], Hq a multiple of Hkv (grouped-query attention: query head h reads
            key/value head h // (Hq / Hkv)).
        prefix_k, prefix_v: [Hkv, L, D], L >= 1, shared by the whole batch (their gradients are summed over it).
        causal: hide main key j from query i when j > i + S - T (bottom-right aligned, as with a KV cache).
            The prefix is visible to every query.
        attn_mask: over the main keys, broadcastable to [B, Hq, T, S]: boolean (True: the key takes part) or an
            additive float mask. Rows whose main keys are all hidden attend to the prefix alone.
        scale: score scale, default 1/sqrt(D).
        dropout_p: dropout on the attention probabilities (not fused: runs the reference path).

    Returns:
        [B, Hq, T, D] in q's dtype.
    """
    q, k, v, prefix_k, prefix_v = autocast_inputs([q, k, v, prefix_k, prefix_v])
    _check_prefix_args(q, k, v, prefix_k, prefix_v, attn_mask, causal, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if dropout_p > 0.0:
        if q.is_cuda:
            notice_once(
                "prefix_attention.dropout",
                f"{OP}: attention dropout is not fused; dropout_p > 0 runs the reference path",
            )
        return reference.prefix_attention_with_dropout(
            q, k, v, prefix_k, prefix_v, attn_mask, causal, scale, dropout_p
        )
    out, _ = prefix_attention_fwd(q, k, v, prefix_k, prefix_v, attn_mask, bool(causal), scale)
    return out


def _check_prefix_args(q, k, v, prefix_k, prefix_v, attn_mask, causal, dropout_p) -> None:
    check_tensor(OP, "q", q, ndim=4)
    check_tensor(OP, "k", k, ndim=4)
    check_tensor(OP, "v", v, ndim=4)
    check_tensor(OP, "prefix_k", prefix_k, ndim=3)
    check_tensor(OP, "prefix_v", prefix_v, ndim=3)
    check_same_dtype_and_device(OP, "q", q, [("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)])
    batch, hq, _, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(f"{OP}: 'k' must be [B={batch}, Hkv, S, D={dim}], got shape {tuple(k.shape)}")
    hkv, s = k.shape[1], k.shape[2]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(
            f"{OP}: the query heads of 'q' ({hq}) must be a multiple of the key/value heads of 'k' ({hkv})"
        )
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"{OP}: 'v' must have the shape of 'k' {tuple(k.shape)}, got {tuple(v.shape)}")
    if prefix_k.shape[0] != hkv or prefix_k.shape[2] != dim or prefix_k.shape[1] < 1:
        raise ValueError(
            f"{OP}: 'prefix_k' must be [Hkv={hkv}, L >= 1, D={dim}], got shape {tuple(prefix_k.shape)}"
        )
    if tuple(prefix_v.shape) != tuple(prefix_k.shape):
        raise ValueError(
            f"{OP}: 'prefix_v' must have the shape of 'prefix_k' {tuple(prefix_k.shape)}, got {tuple(prefix_v.shape)}"
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"{OP}: 'attn_mask' must be a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"{OP}: 'attn_mask' must be boolean or floating point, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"{OP}: 'attn_mask' must be on the device of 'q' ({q.device}), got {attn_mask.device}")
        full = (batch, hq, q.shape[2], s)
        try:
            broadcast = torch.broadcast_shapes(attn_mask.shape, full)
        except RuntimeError:
            broadcast = None
        if broadcast != full:
            raise ValueError(
                f"{OP}: 'attn_mask' must be broadcastable to [B, Hq, T, S] = {full}, got shape {tuple(attn_mask.shape)}"
            )
    if not isinstance(causal, bool):
        raise TypeError(f"{OP}: 'causal' must be a bool, got {type(causal).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{OP}: 'dropout_p' must be in [0, 1), got {dropout_p}")
