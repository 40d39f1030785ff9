"""CUDA path of the prefix-attention op (called only when `kernels_usable` says the extension can run).

Forward, for q [B, Hq, T, D], k/v [B, Hkv, S, D], prefix_k/prefix_v [Hkv, L, D]:

1. Main attention over the S keys by one of PyTorch's fused kernels that return the log-sum-exp
   (`fastpeft/ops/_sdpa_lse.py`): flash without a mask (grouped-query attention native), memory-efficient with an
   additive bias (masks, float32; one call per query group under GQA, no [B, Hq, S, D] copy of k, v).
   Gives (O_main, L_main).
2. One fused kernel for the prefix (`torch.ops.fastpeft_cuda.prefix_forward`, csrc/prefix/; float32 runs the same
   math as cuBLAS products, `_prefix_torch.py`): prefix scores
   q P_k^T * scale, their softmax and log-sum-exp L_pre, O_pre = softmax · P_v, and the gated merge
   O = O_main + sigmoid(L_pre - L_main) (O_pre - O_main), L = logaddexp(L_main, L_pre). Rows whose L_main is not
   finite (no visible main key: flash says +inf, efficient -inf) take the prefix alone.

Backward (ring-attention recipe: every part's backward with the merged O and merged L):

1. Main part: a backend's backward op gives dq_main, dk, dv (flash, or efficient where FA2's backward does not
   take the head dim on this GPU; both accept the merged O and L).
2. One fused kernel (`torch.ops.fastpeft_cuda.prefix_backward`) reads the main part's dq, adds the prefix part and
   writes dq (one pass), and gives dP_k, dP_v summed over the batch and the query heads of each group,
   deterministically. Prefixes longer than one chunk of that kernel (L > 64, 32, 16 for D <= 64, 128, 256) run a
   dq kernel and a chunk-parallel dP kernel instead (csrc/prefix/prefix_bwd_kernel.cuh).

Dispatch (`plan`) sends what the kernels do not cover to the reference path with a one-time notice: float64, head
dims outside 32..256 or not a multiple of 8, private-op schemas that do not match. The composition functions take
the kernels as arguments (`raw` for the aten ops, `prefix` for fastpeft's) so that the CPU tests run this exact glue
with emulations of the kernels' conventions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from fastpeft import reference
from fastpeft._notice import notice_once
from fastpeft.ops import _sdpa_lse
from fastpeft.ops._prefix_torch import TorchPrefixKernels

OP = "fastpeft.prefix_attention"
MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 32, 256, 8
# FA2's backward for head dims above 192 needs the shared memory of sm80 / sm90; elsewhere (sm86, sm89, sm120 ...)
# the main backward runs on the efficient kernel instead.
FLASH_BIG_HEAD_BACKWARD_CAPABILITIES = ((8, 0), (9, 0))


@dataclass(frozen=True)
class Plan:
    """How one call runs. `main`: "flash", "efficient", "none" (no main keys, S == 0) or "reference" (the whole op
    runs the reference math; `reason` says why, for the notice)."""

    main: str
    reason: str = ""


def plan(dtype: torch.dtype, head_dim: int, has_mask: bool, num_keys: int, *, backward: bool = False,
         capability: tuple = (9, 0), problems=_sdpa_lse.backend_problem) -> Plan:
    """Choose the main-attention backend for one call (pure function of shapes and flags; tested on the CPU).

    `problems(backend)` is the schema guard (None when the private ops match); `capability` the GPU's.
    """
    if dtype == torch.float64:
        return Plan("reference", "float64 runs the reference path (no float64 kernels)")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return Plan("reference", f"{dtype} runs the reference path")
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim % HEAD_DIM_MULTIPLE == 0):
        return Plan(
            "reference",
            f"head dim {head_dim} runs the reference path (kernels: {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, "
            f"a multiple of {HEAD_DIM_MULTIPLE})",
        )
    if num_keys == 0:
        return Plan("none")
    flash_ok = dtype != torch.float32 and not has_mask
    if flash_ok and backward and head_dim > 192 and tuple(capability) not in FLASH_BIG_HEAD_BACKWARD_CAPABILITIES:
        flash_ok = False
    candidates = (["flash"] if flash_ok else []) + ["efficient"]
    reasons = []
    for backend in candidates:
        problem = problems(backend)
        if problem is None:
            return Plan(backend)
        reasons.append(problem)
    return Plan("reference", "PyTorch's fused attention ops do not match what fastpeft calls: " + "; ".join(reasons))


def _notice_reference(p: Plan) -> None:
    notice_once(f"prefix_attention.reference.{p.reason}", f"{OP}: {p.reason}")


# ------------------------------------------------------------------------------------------------ masks


def efficient_bias(attn_mask: Optional[Tensor], causal_in_bias: bool, batch: int, heads: int, t: int, s: int,
                   dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
    """The additive bias the efficient kernel takes: [B, Hq, T, S] in `dtype` (broadcast dims as zero strides), -inf
    where a key is hidden, last dim contiguous and every other non-zero stride a multiple of 16 elements.

    `attn_mask` is boolean (True: the key takes part) or additive float, broadcastable to [B, Hq, T, S];
    `causal_in_bias` adds the bottom-right causal mask (used when T != S: the kernel's own causal flag is top-left).
    Returns None when there is nothing to add.
    """
    if attn_mask is None and not causal_in_bias:
        return None
    bias = reference.main_score_bias(attn_mask, causal_in_bias, batch, heads, t, s, dtype, device)
    # main_score_bias broadcasts to [B, Hq, T, S]; keep the dims it broadcast (stride 0) at size 1, so that a padding
    # mask is not copied over heads and rows.
    for dim in range(3):
        if bias.stride(dim) == 0:
            bias = bias.narrow(dim, 0, 1)
    # Copy into storage whose last dim is padded to a multiple of 16 (row strides aligned), keeping broadcast dims
    # of size 1; then broadcast to the full shape with zero strides (no copy).
    padded_s = -(-s // _sdpa_lse.EFFICIENT_BIAS_ALIGN) * _sdpa_lse.EFFICIENT_BIAS_ALIGN
    shape = tuple(bias.shape[:3])
    storage = torch.empty(*shape, padded_s, dtype=dtype, device=device)
    aligned = storage[..., :s]
    aligned.copy_(bias)
    return aligned.expand(batch, heads, t, s)


def bias_for_group(bias: Optional[Tensor], groups: int, g: int) -> Optional[Tensor]:
    """The bias of query group g: [B, Hq, T, S] -> [B, Hkv, T, S] for the query heads h with h % groups == g."""
    if bias is None or groups == 1:
        return bias
    return bias.unflatten(1, (bias.shape[1] // groups, groups))[:, :, g]


def query_group(t: Tensor, groups: int, g: int) -> Tensor:
    """[B, Hq, ...] -> [B, Hkv, ...] for the query heads of group g (head h = kv * groups + g), a strided view."""
    if groups == 1:
        return t
    return t.unflatten(1, (t.shape[1] // groups, groups))[:, :, g]


# ------------------------------------------------------------------------------------------------ main attention


def last_dim_contiguous(t: Tensor) -> Tensor:
    """Both fused kernels need a unit stride along the head dim (any other strides are fine)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def main_forward(raw, backend: str, q, k, v, attn_mask, causal: bool, scale: float):
    """(O_main [B, Hq, T, D], L_main [B, Hq, T] fp32, possibly strided views) by the chosen backend.

    Flash takes grouped-query attention natively; efficient runs once per query group (no [B, Hq, S, D] copy of k/v)
    and its padded LSE is sliced to T. L_main keeps each kernel's own value for rows without keys (+inf / -inf):
    the prefix kernel treats every non-finite L_main as "no main key".
    """
    batch, hq, t, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    if backend == "flash":
        return raw.flash_forward(q, k, v, causal, scale)
    groups = hq // hkv
    causal_flag = causal and t == s
    bias = efficient_bias(attn_mask, causal and t != s, batch, hq, t, s, q.dtype, q.device)
    outs, lses = [], []
    for g in range(groups):
        o_g, lse_g = raw.efficient_forward(query_group(q, groups, g), k, v, bias_for_group(bias, groups, g),
                                           causal_flag, scale)
        outs.append(o_g)
        lses.append(lse_g[..., :t])
    if groups == 1:
        return outs[0], lses[0]
    return torch.stack(outs, dim=2).flatten(1, 2), torch.stack(lses, dim=2).flatten(1, 2)


def main_backward(raw, backend: str, dout, q, k, v, attn_mask, out, lse, causal: bool, scale: float, needs):
    """(dq, dk, dv) of the main part, from the merged out and lse. needs = (dq, dk, dv) wanted."""
    batch, hq, t, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    dout, q, k, v, out = (last_dim_contiguous(x) for x in (dout, q, k, v, out))
    if backend == "flash":
        return raw.flash_backward(dout, q, k, v, out, lse, causal, scale)
    groups = hq // hkv
    causal_flag = causal and t == s
    bias = efficient_bias(attn_mask, causal and t != s, batch, hq, t, s, q.dtype, q.device)
    # The kernel reads its LSE with the padded row length; the pad is +inf (a pad row's probabilities are 0).
    lse_padded = torch.full((batch, hq, _sdpa_lse.padded_lse_length(t)), float("inf"), dtype=lse.dtype,
                            device=lse.device)
    lse_padded[..., :t] = lse
    dqs, dk, dv = [], None, None
    for g in range(groups):
        pick = lambda x: query_group(x, groups, g)  # noqa: E731
        dq_g, dk_g, dv_g = raw.efficient_backward(
            pick(dout), pick(q), k, v, bias_for_group(bias, groups, g), pick(out),
            pick(lse_padded).contiguous(), causal_flag, scale, needs,
        )
        dqs.append(dq_g)
        if groups == 1:
            return dq_g, dk_g, dv_g
        # Sum the groups' key/value gradients in float32 (float64 for float64), round once.
        acc = reference.compute_dtype(k.dtype)
        if needs[1]:
            dk = dk_g.to(acc) if dk is None else dk + dk_g.to(acc)
        if needs[2]:
            dv = dv_g.to(acc) if dv is None else dv + dv_g.to(acc)
    dq = (dqs[0] if groups == 1 else torch.stack(dqs, dim=2).flatten(1, 2)) if needs[0] else None
    return dq, (dk.to(k.dtype) if dk is not None else None), (dv.to(v.dtype) if dv is not None else None)


# ------------------------------------------------------------------------------------------------ composition


def compose_forward(raw, prefix, p: Plan, q, k, v, prefix_k, prefix_v, attn_mask, causal, scale):
    """The op's forward on a non-reference plan: main attention, then the fused prefix kernel."""
    if p.main == "none":
        o_main, l_main = None, None
    else:
        o_main, l_main = main_forward(raw, p.main, q, k, v, attn_mask, causal, scale)
    return prefix.forward(q, prefix_k, prefix_v, o_main, l_main, scale)


def compose_backward(raw, prefix, p: Plan, dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale,
                     needs):
    """The op's backward on a non-reference plan: the main part's backward with the merged (out, lse), then the
    fused prefix kernel reads the main part's dq, adds the prefix part (one pass, one rounding) and gives
    dprefix_k, dprefix_v. Every gradient comes back contiguous, as the op's fake implementation says."""
    need_q, need_k, need_v, need_pk, need_pv = (bool(n) for n in needs)
    dq_main = dk = dv = None
    if p.main != "none" and (need_q or need_k or need_v):
        dq_main, dk, dv = main_backward(raw, p.main, dout, q, k, v, attn_mask, out, lse, causal, scale,
                                        (need_q, need_k, need_v))
    dq = dpk = dpv = None
    if need_q or need_pk or need_pv:
        dq, dpk, dpv = prefix.backward(dout, q, prefix_k, prefix_v, out, lse, dq_main if need_q else None, scale,
                                       need_q, need_pk or need_pv)
    # No main keys: the main part of dk, dv is zero-sized anyway ([B, Hkv, 0, D]).
    dk = (torch.zeros_like(k) if dk is None else dk.contiguous()) if need_k else None
    dv = (torch.zeros_like(v) if dv is None else dv.contiguous()) if need_v else None
    empty = q.new_empty(0)
    return tuple(g if n else empty for g, n in zip((dq, dk, dv, dpk, dpv), (need_q, need_k, need_v, need_pk, need_pv)))


class CudaPrefixKernels:
    """fastpeft's fused prefix kernels (csrc/prefix/), as `compose_*` call them."""

    def forward(self, q, prefix_k, prefix_v, o_main, l_main, scale):
        return torch.ops.fastpeft_cuda.prefix_forward(q, prefix_k, prefix_v, o_main, l_main, scale)

    def backward(self, dout, q, prefix_k, prefix_v, out, lse, dq_main, scale, need_dq, need_dprefix):
        dq, dpk, dpv = torch.ops.fastpeft_cuda.prefix_backward(dout, q, prefix_k, prefix_v, out, lse, dq_main, scale,
                                                              need_dq, need_dprefix)
        return (dq if need_dq else None), (dpk if need_dprefix else None), (dpv if need_dprefix else None)


_RAW = _sdpa_lse.AtenAttention()
_PREFIX_CUDA = CudaPrefixKernels()
_PREFIX_TORCH = TorchPrefixKernels()


def prefix_kernels_for(dtype: torch.dtype):
    """The fused kernels for the tensor-core dtypes; float32's prefix part runs as cuBLAS products (it must match
    eager float32, which tensor-core TF32 would not)."""
    return _PREFIX_CUDA if dtype in (torch.float16, torch.bfloat16) else _PREFIX_TORCH


def _plan_for(q, attn_mask, num_keys, backward):
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else (0, 0)
    return plan(q.dtype, q.shape[-1], attn_mask is not None, num_keys, backward=backward, capability=capability)


def forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale):
    p = _plan_for(q, attn_mask, k.shape[2], backward=False)
    if p.main == "reference":
        _notice_reference(p)
        return reference.prefix_attention_forward(q, k, v, prefix_k, prefix_v, attn_mask, causal, scale)
    return compose_forward(_RAW, prefix_kernels_for(q.dtype), p, q, k, v, prefix_k, prefix_v, attn_mask, causal, scale)


def backward(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal, scale, needs):
    p = _plan_for(q, attn_mask, k.shape[2], backward=True)
    if p.main == "reference":
        _notice_reference(p)
        return reference.prefix_attention_backward(dout, q, k, v, prefix_k, prefix_v, attn_mask, out, lse, causal,
                                                   scale)
    return compose_backward(_RAW, prefix_kernels_for(q.dtype), p, dout, q, k, v, prefix_k, prefix_v, attn_mask, out,
                            lse, causal, scale, needs)
