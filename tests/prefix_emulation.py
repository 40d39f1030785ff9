"""CPU emulation of PyTorch's private fused-attention ops, with their conventions and input constraints.

`EmulatedAten` has the four methods of `fastpeft.ops._sdpa_lse.AtenAttention`. It computes in float64 and checks
what the real kernels require of their inputs (no mask for flash; for the efficient kernel equal head counts, a
4-D bias in q's dtype with aligned strides, and its padded LSE), and it reproduces their conventions for rows that
see no key (flash: out 0, LSE +inf; efficient: LSE -inf and an output of NaN, which must never be read), and the
efficient kernel's padded LSE with NaN in the pad (which must never be read either). So the glue in
`fastpeft/ops/_prefix_cuda.py` is proven against the contract of the kernels it calls, on the CPU.
"""

from __future__ import annotations

import torch

from fastpeft.ops import _sdpa_lse


def _causal_hidden(t, s, aligned):
    rows = torch.arange(t).unsqueeze(1)
    cols = torch.arange(s).unsqueeze(0)
    return cols > rows + (s - t) if aligned == "bottom-right" else cols > rows


def _scores(q, k, bias, causal, scale):
    """Scores [B, Hq, T, S] in float64 with -inf where hidden; k is repeated over query groups."""
    groups = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(groups, dim=1)
    scores = q.double() @ kk.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double()
    if causal is not None:
        scores = scores.masked_fill(_causal_hidden(q.shape[2], k.shape[2], causal), float("-inf"))
    return scores


def _grads(dout, q, k, v, scores, out, lse, scale):
    """Main-part gradients from the given (merged) out and lse: P = exp(S - L), D = rowsum(dO * O)."""
    groups = q.shape[1] // k.shape[1]
    p = torch.exp(scores - lse.double().unsqueeze(-1))
    vv = v.double().repeat_interleave(groups, dim=1)
    kk = k.double().repeat_interleave(groups, dim=1)
    delta = (dout.double() * out.double()).sum(-1, keepdim=True)
    ds = p * (dout.double() @ vv.transpose(-1, -2) - delta)
    dq = ds @ kk * scale
    dk = (ds.transpose(-1, -2) @ q.double() * scale).unflatten(1, (k.shape[1], groups)).sum(2)
    dv = (p.transpose(-1, -2) @ dout.double()).unflatten(1, (k.shape[1], groups)).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _check_head_dim_contiguous(*tensors):
    for t in tensors:
        assert t.stride(-1) == 1, f"the fused kernels need a unit stride along the head dim, got {t.stride()}"


class EmulatedAten:
    def __init__(self):
        self.calls = []

    # -------------------------------------------------------------------------------------------- flash

    def flash_forward(self, q, k, v, causal, scale):
        self.calls.append("flash_forward")
        assert q.shape[1] % k.shape[1] == 0
        _check_head_dim_contiguous(q, k, v)
        scores = _scores(q, k, None, "bottom-right" if causal else None, scale)
        lse = torch.logsumexp(scores, -1)
        empty = torch.isinf(lse)
        p = torch.exp(scores - lse.masked_fill(empty, 0).unsqueeze(-1))
        out = p @ v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        # FA2 (non-split): a row without keys has out 0 and LSE +inf.
        return out.masked_fill(empty.unsqueeze(-1), 0.0).to(q.dtype), lse.masked_fill(empty, float("inf"))

    def flash_backward(self, dout, q, k, v, out, lse, causal, scale):
        self.calls.append("flash_backward")
        _check_head_dim_contiguous(dout, q, k, v, out)
        assert lse.shape == q.shape[:3], f"flash takes an unpadded LSE {tuple(q.shape[:3])}, got {tuple(lse.shape)}"
        assert torch.isfinite(lse).all(), "the merged LSE is finite (the prefix is visible to every row)"
        scores = _scores(q, k, None, "bottom-right" if causal else None, scale)
        # Like FA2 in PyTorch, gradients take their input's strides (empty_like), not necessarily contiguous.
        grads = _grads(dout, q, k, v, scores, out, lse, scale)
        return tuple(torch.empty_like(x).copy_(g) for x, g in zip((q, k, v), grads))

    # -------------------------------------------------------------------------------------------- efficient

    @staticmethod
    def _check_efficient(q, k, bias, causal):
        _check_head_dim_contiguous(q, k)
        assert q.shape[1] == k.shape[1], "the glue must not rely on GQA support of the efficient kernel"
        if causal:
            assert q.shape[2] == k.shape[2], "the efficient kernel's causal flag is top-left: only for T == S"
        if bias is not None:
            assert bias.dim() == 4 and tuple(bias.shape) == (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            assert bias.dtype == q.dtype, "the efficient kernel wants the bias in q's dtype"
            assert bias.stride(-1) == 1, "the bias' last dim must be contiguous"
            for size, stride in zip(bias.shape[:3], bias.stride()[:3]):
                assert size == 1 or stride % _sdpa_lse.EFFICIENT_BIAS_ALIGN == 0, f"unaligned bias stride {stride}"

    def efficient_forward(self, q, k, v, bias, causal, scale):
        self.calls.append("efficient_forward")
        self._check_efficient(q, k, bias, causal)
        scores = _scores(q, k, bias, "top-left" if causal else None, scale)
        lse = torch.logsumexp(scores, -1)  # -inf for rows whose keys are all hidden
        out = torch.softmax(scores, -1) @ v.double()  # NaN for those rows: must not be read
        t = q.shape[2]
        padded = torch.full((*lse.shape[:2], _sdpa_lse.padded_lse_length(t)), float("nan"), dtype=lse.dtype)
        padded[..., :t] = lse
        return out.to(q.dtype), padded

    def efficient_backward(self, dout, q, k, v, bias, out, lse_padded, causal, scale, needs):
        self.calls.append("efficient_backward")
        self._check_efficient(q, k, bias, causal)
        t = q.shape[2]
        assert lse_padded.shape == (*q.shape[:2], _sdpa_lse.padded_lse_length(t)) and lse_padded.is_contiguous()
        lse = lse_padded[..., :t]
        assert torch.isfinite(lse).all()
        scores = _scores(q, k, bias, "top-left" if causal else None, scale)
        grads = _grads(dout, q, k, v, scores, out, lse, scale)
        # Like the efficient kernel, gradients come in [B, T, H, D] memory (meta: empty_permuted(..., (0, 2, 1, 3))).
        bshd = tuple(torch.empty_permuted(g.shape, (0, 2, 1, 3), dtype=g.dtype).copy_(g) for g in grads)
        return tuple(g if n else None for g, n in zip(bshd, needs))
