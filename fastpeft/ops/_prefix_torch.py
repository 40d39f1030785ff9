"""The prefix part of prefix attention in plain PyTorch, with the exact semantics of the fused CUDA kernels.

`TorchPrefixKernels` has the interface of `_prefix_cuda.CudaPrefixKernels` (forward: prefix attention and the gated
merge; backward: dq = dq_main + prefix part, dprefix_k, dprefix_v). It runs

- the float32 prefix part on the GPU (the fused kernels use bf16/fp16 tensor cores; float32 must match eager
  float32 matmuls, so it goes through cuBLAS here, with the main attention still on the efficient kernel), and
- the CPU tests of the composition in `_prefix_cuda` (the glue around the kernels is proven on the CPU).

Batch folding: the prefix is shared by the batch and by the query heads of a group, so for key/value head h the
rows (b, g, t) of q form one [B * G * T, D] matrix against P_k[h] [L, D]. Products are batched over Hkv only: no
[B, H, L, D] expanded copy of the prefix, and dP_k, dP_v come out summed over the batch by the matrix product.

Conventions (shared with csrc/prefix/prefix_params.h):
- `l_main` None means there are no main keys at all; a row whose l_main is not finite (+inf from flash, -inf from
  the efficient kernel, NaN) has no visible main key: it takes the prefix alone (its o_main is not read).
- lse is the natural-log log-sum-exp, computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastpeft import reference


def fold_rows(t: Tensor, hkv: int) -> Tensor:
    """[B, Hq, T, ...] -> [Hkv, B * G * T, ...], rows in (b, g, t) order (a copy unless already in that order)."""
    batch, hq, steps = t.shape[:3]
    grouped = t.unflatten(1, (hkv, hq // hkv)).transpose(0, 1)  # [Hkv, B, G, T, ...]
    return grouped.reshape(hkv, batch * (hq // hkv) * steps, *t.shape[3:])


def unfold_rows(t: Tensor, batch: int, hq: int, steps: int) -> Tensor:
    """Inverse of `fold_rows`: [Hkv, B * G * T, ...] -> [B, Hq, T, ...]."""
    hkv = t.shape[0]
    return t.reshape(hkv, batch, hq // hkv, steps, *t.shape[2:]).transpose(0, 1).flatten(1, 2)


def merge_with_conventions(o_main, l_main, o_pre, l_pre):
    """The gated merge, with every non-finite l_main read as "no visible main key" (o_main not read there)."""
    if l_main is None:
        return o_pre, l_pre
    empty = ~torch.isfinite(l_main)
    l_main = l_main.masked_fill(empty, float("-inf"))
    o_main = o_main.masked_fill(empty.unsqueeze(-1), 0.0)
    return reference.merge_attention_states(o_main, l_main, o_pre, l_pre)


class TorchPrefixKernels:
    def forward(self, q, prefix_k, prefix_v, o_main, l_main, scale):
        batch, hq, steps, _ = q.shape
        hkv = prefix_k.shape[0]
        cdt = reference.compute_dtype(q.dtype)
        scores = fold_rows(q.to(cdt), hkv).bmm(prefix_k.to(cdt).transpose(1, 2)) * scale  # [Hkv, R, L]
        l_pre = torch.logsumexp(scores, dim=-1)
        o_pre = torch.exp(scores - l_pre.unsqueeze(-1)).bmm(prefix_v.to(cdt))
        o_pre = unfold_rows(o_pre, batch, hq, steps)
        l_pre = unfold_rows(l_pre, batch, hq, steps)
        main = None if o_main is None else o_main.to(cdt)
        lm = None if l_main is None else l_main.to(cdt)
        out, lse = merge_with_conventions(main, lm, o_pre, l_pre)
        return out.to(q.dtype).contiguous(), lse.contiguous()

    def backward(self, dout, q, prefix_k, prefix_v, out, lse, dq_main, scale, need_dq, need_dprefix):
        """(dq, dprefix_k, dprefix_v): dq = dq_main (None: zero) + the prefix part, contiguous; None when not needed."""
        batch, hq, steps, _ = q.shape
        hkv = prefix_k.shape[0]
        cdt = reference.compute_dtype(q.dtype)
        qf = fold_rows(q.to(cdt), hkv)
        dof = fold_rows(dout.to(cdt), hkv)
        delta = (dof * fold_rows(out.to(cdt), hkv)).sum(-1, keepdim=True)  # D = rowsum(dO * O), merged O
        pk, pv = prefix_k.to(cdt), prefix_v.to(cdt)
        # Probabilities against the merged lse: the prefix keys' share of the whole softmax.
        p = torch.exp(qf.bmm(pk.transpose(1, 2)) * scale - fold_rows(lse.to(cdt), hkv).unsqueeze(-1))
        ds = p * (dof.bmm(pv.transpose(1, 2)) - delta)
        dq = None
        if need_dq:
            dq = unfold_rows(ds.bmm(pk) * scale, batch, hq, steps)
            if dq_main is not None:
                dq = dq + dq_main.to(cdt)
            dq = dq.to(q.dtype).contiguous()
        if not need_dprefix:
            return dq, None, None
        dpk = ds.transpose(1, 2).bmm(qf) * scale
        dpv = p.transpose(1, 2).bmm(dof)
        return dq, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
