"""Micro benchmark of `fastpeft.prefix_attention` (issue 4): attention of q over [prefix; keys], the prefix shared by
the batch (P_k, P_v: [H, L, D], trainable), q, k, v [B, H, T, D] with T = S.

Methods: `bidirectional` (no mask; encoders) and `causal` (the main keys causally masked, the prefix visible to every
query; decoders).

Providers:
- fastpeft: the op;
- concat: what `adapters` and `peft` do: the prefix expanded to the batch and concatenated onto K and V, then
  `scaled_dot_product_attention` (causal: with the extended boolean mask, built once per case, untimed);
- sdpa: `scaled_dot_product_attention` on the sequence alone, no prefix (the floor: it does less work).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastpeft
from benchmarks.micro import Op

SUBJECT = "prefix"
METHODS = ("bidirectional", "causal")
PROVIDERS = ("fastpeft", "concat", "sdpa")

# Issue 4: B = 8, H = 16 or 32, D = 64 or 128, T = S in {512, 2048, 8192}, L in {10, 30, 200}.
FULL = dict(batch=8, heads_dims=((16, 64), (32, 128)), lengths=(512, 2048, 8192), prefixes=(10, 30, 200))
QUICK = dict(batch=2, heads_dims=((4, 32),), lengths=(128,), prefixes=(10, 64))


def cases(quick: bool) -> list[dict]:
    grid = QUICK if quick else FULL
    return [
        {
            "case": f"B={grid['batch']} H={h} D={dim} T={t} L={length}",
            "method": method,
            "shape": {"B": grid["batch"], "H": h, "D": dim, "T": t, "S": t, "L": length},
        }
        for method in METHODS
        for h, dim in grid["heads_dims"]
        for t in grid["lengths"]
        for length in grid["prefixes"]
    ]


def providers(method: str) -> tuple[str, ...]:
    return PROVIDERS


def work(case: dict, mode: str, provider: str, element_bytes: int) -> dict:
    """Useful FLOPs (visible query-key pairs, 4 D FLOPs each forward, 2.5x that backward) and minimal bytes
    (q, k, v, out; backward also dout, dq, dk, dv). The sdpa floor has no prefix, so no prefix work."""
    sh = case["shape"]
    b, h, d, t, s = sh["B"], sh["H"], sh["D"], sh["T"], sh["S"]
    length = 0 if provider == "sdpa" else sh["L"]
    main_pairs = t * (t + 1) // 2 if case["method"] == "causal" else t * s
    fwd_flops = 4 * b * h * d * (main_pairs + t * length)
    tensor = b * h * t * d
    prefix = 2 * h * length * d
    flops = {"forward": fwd_flops, "backward": 2.5 * fwd_flops, "full": 3.5 * fwd_flops}[mode]
    elems = {"forward": 4 * tensor + prefix, "backward": 8 * tensor + 2 * prefix, "full": 12 * tensor + 3 * prefix}
    return {"bytes": elems[mode] * element_bytes, "flops": int(flops)}


def build(case: dict, provider: str, device: torch.device, dtype: torch.dtype) -> Op:
    sh = case["shape"]
    b, h, d, t, s, length = sh["B"], sh["H"], sh["D"], sh["T"], sh["S"], sh["L"]
    causal = case["method"] == "causal"

    def tensor(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    def make():
        return tensor(b, h, t, d), tensor(b, h, s, d), tensor(b, h, s, d)

    prefix_k, prefix_v = tensor(h, length, d), tensor(h, length, d)
    params = [prefix_k, prefix_v]

    if provider == "fastpeft":
        def fn(q, k, v):
            return fastpeft.prefix_attention(q, k, v, prefix_k, prefix_v, causal=causal)
    elif provider == "concat":
        mask = None
        if causal:  # prefix columns visible; main keys causal, bottom-right aligned
            rows = torch.arange(t, device=device).unsqueeze(1)
            cols = torch.arange(s, device=device).unsqueeze(0)
            main = cols <= rows + (s - t)
            mask = torch.cat([torch.ones(t, length, dtype=torch.bool, device=device), main], dim=1)

        def fn(q, k, v):
            keys = torch.cat([prefix_k.unsqueeze(0).expand(b, -1, -1, -1), k], dim=2)
            values = torch.cat([prefix_v.unsqueeze(0).expand(b, -1, -1, -1), v], dim=2)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    elif provider == "sdpa":
        params = []

        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    return Op(fn=fn, make_inputs=make, params=params)
