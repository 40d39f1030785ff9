"""Plain-PyTorch reference math for fastpeft's two ops.

This module is the specification the CUDA kernels are tested against, and the working implementation wherever
the kernels are not built or do not cover a shape (CPU, unsupported dtypes or sizes). Every function here is plain
tensor math with no autograd tricks: forward and backward are written out by hand so that the custom ops in
`fastpeft.ops` can save exactly what backward needs and nothing more.

Adapter (unified view, He et al. 2022):

    z = x @ w_down.T + b_down          [N, r]   pre-activation, the only intermediate saved for backward
    a = act(z)
    y = h + s * (a @ w_up.T + b_up)    [N, d_out]

Prefix attention (prefix tuning as a gated parallel adapter, PAPER.md section 3):

    (O_main, L_main) = attention of q over the main keys, with its log-sum-exp
    (O_pre,  L_pre)  = attention of q over the prefix keys, with its log-sum-exp
    O = O_main + sigmoid(L_pre - L_main) * (O_pre - O_main),   L = logaddexp(L_main, L_pre)

Log-sum-exps use the natural log. A query row with no visible main key has L_main = -inf and O_main = 0, so it
takes the prefix alone.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu", "tanh")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------------


def activate(z: Tensor, activation: str) -> Tensor:
    """act(z) for one of `ACTIVATIONS`, in z's dtype (PyTorch computes half types in float32 internally)."""
    if activation == "identity":
        return z
    if activation == "relu":
        return torch.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    if activation == "tanh":
        return torch.tanh(z)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def activation_derivative(z: Tensor, activation: str) -> Tensor:
    """d act(z) / dz, computed in float32 (float64 for float64 z), the way PyTorch's own backward kernels do."""
    zc = z.double() if z.dtype == torch.float64 else z.float()
    if activation == "identity":
        return torch.ones_like(zc)
    if activation == "relu":
        return (zc > 0).to(zc.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(zc * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * zc * zc) * _INV_SQRT_2PI
        return cdf + zc * pdf
    if activation == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (zc + 0.044715 * zc.pow(3))
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * zc * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * zc * zc)
    if activation == "silu":
        sig = torch.sigmoid(zc)
        return sig * (1.0 + zc * (1.0 - sig))
    if activation == "tanh":
        t = torch.tanh(zc)
        return 1.0 - t * t
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


# ----------------------------------------------------------------------------------------------------------------
# Adapter
# ----------------------------------------------------------------------------------------------------------------


def _scale_value(scale_tensor: Optional[Tensor], scale: float, dtype: torch.dtype):
    """The scale as something that multiplies a `dtype` tensor: a 0-d tensor (learned scale) or a Python float."""
    if scale_tensor is None:
        return scale
    return scale_tensor.reshape(()).to(dtype)


def adapter_forward(
    x: Tensor,
    h: Optional[Tensor],
    w_down: Tensor,
    w_up: Tensor,
    b_down: Optional[Tensor],
    b_up: Optional[Tensor],
    scale_tensor: Optional[Tensor],
    scale: float,
    activation: str,
) -> tuple[Tensor, Tensor]:
    """y = h + s * (act(x w_down^T + b_down) w_up^T + b_up) on 2-D x [N, d_in]; h None means h is x (sequential).

    Returns (y, z) with z = x w_down^T + b_down, the [N, r] pre-activation backward needs.
    """
    z = F.linear(x, w_down, b_down)
    up = F.linear(activate(z, activation), w_up, b_up)
    residual = x if h is None else h
    if scale_tensor is None:
        y = torch.add(residual, up, alpha=scale)
    else:
        y = torch.addcmul(residual, up, _scale_value(scale_tensor, scale, up.dtype))
    return y, z


def adapter_backward(
    dy: Tensor,
    x: Tensor,
    w_down: Tensor,
    w_up: Tensor,
    b_up: Optional[Tensor],
    z: Tensor,
    scale_tensor: Optional[Tensor],
    scale: float,
    activation: str,
    sequential: bool,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `adapter_forward` given dy = dL/dy.

    `needs` = (dx, dw_down, db_down, dw_up, db_up, dscale): a gradient that is not needed is returned as an empty
    tensor. dx includes dy when `sequential` (x is also the residual). The gradient of h is dy itself and is not
    computed here.

        G       = dy^T act(z)                 [d_out, r]
        dw_up   = s G,   db_up = s colsum(dy)
        dscale  = <G, w_up> + <colsum(dy), b_up>
        dz      = s (dy w_up) * act'(z)       [N, r]
        dw_down = dz^T x,   db_down = colsum(dz),   dx = dz w_down (+ dy)
    """
    need_dx, need_dw_down, need_db_down, need_dw_up, need_db_up, need_dscale = needs
    need_dscale = need_dscale and scale_tensor is not None
    s = _scale_value(scale_tensor, scale, dy.dtype)
    # Gradients not asked for are distinct empty tensors (op outputs must not alias each other).
    dx, dw_down, db_down, dw_up, db_up, dscale = (dy.new_empty(0) for _ in range(6))

    if need_dw_up or need_dscale:
        g = dy.t().matmul(activate(z, activation))
        if need_dw_up:
            dw_up = g * s
        if need_dscale:
            acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
            total = (g.to(acc) * w_up.to(acc)).sum()
            if b_up is not None:
                total = total + (dy.to(acc).sum(0) * b_up.to(acc)).sum()
            dscale = total.to(scale_tensor.dtype).reshape(scale_tensor.shape)
    if need_db_up:
        db_up = dy.sum(0) * s

    if need_dx or need_dw_down or need_db_down:
        da = dy.matmul(w_up)
        dz = (da * activation_derivative(z, activation)).to(dy.dtype) * s
        if need_dw_down:
            dw_down = dz.t().matmul(x)
        if need_db_down:
            db_down = dz.sum(0)
        if need_dx:
            dx = dz.matmul(w_down)
            if sequential:
                dx = dx + dy
    return dx, dw_down, db_down, dw_up, db_up, dscale


# ----------------------------------------------------------------------------------------------------------------
# Prefix attention
# ----------------------------------------------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and merges run in float32 (float64 for float64 inputs), as fused attention kernels do."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def main_score_bias(
    attn_mask: Optional[Tensor], causal: bool, batch: int, heads: int, t: int, s: int, dtype, device
) -> Optional[Tensor]:
    """Additive bias over the main keys, broadcastable to [B, Hq, T, S] (-inf where a key is hidden), or None.

    A boolean mask is True where the key takes part (as in scaled_dot_product_attention); a float mask is added.
    `causal` hides key j from query i when j > i + (S - T): the mask is bottom-right aligned, as in decoding with
    a KV cache.
    """
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=dtype, device=device).masked_fill(~attn_mask, float("-inf"))
        else:
            bias = attn_mask.to(dtype)
    if causal:
        rows = torch.arange(t, device=device).unsqueeze(1)
        cols = torch.arange(s, device=device).unsqueeze(0)
        hidden = torch.zeros(t, s, dtype=dtype, device=device).masked_fill(cols > rows + (s - t), float("-inf"))
        bias = hidden if bias is None else bias + hidden
    if bias is None:
        return None
    return bias.expand(batch, heads, t, s)


def _grouped(t: Tensor, hkv: int) -> Tensor:
    """[B, Hq, ...] -> [B, Hkv, G, ...]: query head h reads key/value head h // G (grouped-query attention)."""
    return t.unflatten(1, (hkv, t.shape[1] // hkv))


def _scores(q5: Tensor, keys: Tensor, scale: float) -> Tensor:
    """q5 [B, Hkv, G, T, D] against keys [B, Hkv, S, D] or [Hkv, L, D] -> scores [B, Hkv, G, T, S|L]."""
    if keys.dim() == 3:
        keys = keys.unsqueeze(0)
    return q5.matmul(keys.unsqueeze(2).transpose(-1, -2)) * scale


def _softmax_state(scores: Tensor) -> tuple[Tensor, Tensor]:
    """(probabilities, log-sum-exp) of scores along the last dim; all -inf rows give zero probabilities, L = -inf."""
    lse = torch.logsumexp(scores, dim=-1)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    return torch.exp(scores - finite_lse.unsqueeze(-1)), lse


def merge_attention_states(o_a: Tensor, l_a: Tensor, o_b: Tensor, l_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two attention states over disjoint key sets: O = O_a + sigmoid(L_b - L_a) (O_b - O_a).

    With L_a = -inf (no visible key in set a) the gate is exactly 1 and O = O_b.
    """
    gate = torch.sigmoid(l_b - l_a).unsqueeze(-1)
    return o_a + gate * (o_b - o_a), torch.logaddexp(l_a, l_b)


def _main_and_prefix_scores(q, k, prefix_k, attn_mask, causal, scale):
    batch, hq, t, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    cdt = compute_dtype(q.dtype)
    q5 = _grouped(q.to(cdt), hkv)
    main = _scores(q5, k.to(cdt), scale)
    bias = main_score_bias(attn_mask, causal, batch, hq, t, s, cdt, q.device)
    if bias is not None:
        main = main + _grouped(bias, hkv)
    prefix = _scores(q5, prefix_k.to(cdt), scale)
    return q5, main, prefix


def prefix_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    attn_mask: Optional[Tensor],
    causal: bool,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Attention of q [B, Hq, T, D] over [prefix; k] / [prefix; v] as the gated merge of two attention states.

    Returns (out [B, Hq, T, D] in q's dtype, lse [B, Hq, T] in float32, float64 for float64 inputs).
    """
    cdt = compute_dtype(q.dtype)
    _, main, prefix = _main_and_prefix_scores(q, k, prefix_k, attn_mask, causal, scale)
    p_main, l_main = _softmax_state(main)
    p_pre, l_pre = _softmax_state(prefix)
    o_main = p_main.matmul(v.to(cdt).unsqueeze(2))
    o_pre = p_pre.matmul(prefix_v.to(cdt).unsqueeze(0).unsqueeze(2))
    out, lse = merge_attention_states(o_main, l_main, o_pre, l_pre)
    return out.flatten(1, 2).to(q.dtype), lse.flatten(1, 2)


def prefix_attention_backward(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) of `prefix_attention_forward` from the merged out and lse.

    Each part's probabilities are recomputed against the merged log-sum-exp, P = exp(S - L), and
    D = rowsum(dO * O) uses the merged output, so each part's gradient is exact (the ring-attention recipe).
    Prefix gradients are summed over the batch and over the query heads that share a key/value head.
    """
    hkv = k.shape[1]
    cdt = compute_dtype(q.dtype)
    q5, main, prefix = _main_and_prefix_scores(q, k, prefix_k, attn_mask, causal, scale)
    l5 = _grouped(lse.to(cdt), hkv).unsqueeze(-1)
    do5 = _grouped(dout.to(cdt), hkv)
    delta = (do5 * _grouped(out.to(cdt), hkv)).sum(-1, keepdim=True)

    p_main = torch.exp(main - l5)
    p_pre = torch.exp(prefix - l5)
    ds_main = p_main * (do5.matmul(v.to(cdt).unsqueeze(2).transpose(-1, -2)) - delta)
    ds_pre = p_pre * (do5.matmul(prefix_v.to(cdt).unsqueeze(0).unsqueeze(2).transpose(-1, -2)) - delta)

    dq = (ds_main.matmul(k.to(cdt).unsqueeze(2)) + ds_pre.matmul(prefix_k.to(cdt).unsqueeze(0).unsqueeze(2))) * scale
    dk = ds_main.transpose(-1, -2).matmul(q5).sum(2) * scale
    dv = p_main.transpose(-1, -2).matmul(do5).sum(2)
    dprefix_k = ds_pre.transpose(-1, -2).matmul(q5).sum((0, 2)) * scale
    dprefix_v = p_pre.transpose(-1, -2).matmul(do5).sum((0, 2))
    return (
        dq.flatten(1, 2).to(q.dtype),
        dk.to(k.dtype),
        dv.to(v.dtype),
        dprefix_k.to(prefix_k.dtype),
        dprefix_v.to(prefix_v.dtype),
    )


def prefix_attention_with_dropout(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    attn_mask: Optional[Tensor],
    causal: bool,
    scale: float,
    dropout_p: float,
) -> Tensor:
    """Prefix attention with dropout on the attention probabilities, differentiable by autograd.

    Dropout is not fused in any kernel: this composite path keeps the two key sets apart (no concatenation) and
    normalises both by the merged log-sum-exp, then drops probabilities as scaled_dot_product_attention does.
    """
    cdt = compute_dtype(q.dtype)
    _, main, prefix = _main_and_prefix_scores(q, k, prefix_k, attn_mask, causal, scale)
    lse = torch.logaddexp(torch.logsumexp(main, -1), torch.logsumexp(prefix, -1)).unsqueeze(-1)
    p_main = F.dropout(torch.exp(main - lse), dropout_p)
    p_pre = F.dropout(torch.exp(prefix - lse), dropout_p)
    out = p_main.matmul(v.to(cdt).unsqueeze(2)) + p_pre.matmul(prefix_v.to(cdt).unsqueeze(0).unsqueeze(2))
    return out.flatten(1, 2).to(q.dtype)
