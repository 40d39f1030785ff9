"""A small demo of fastpeft's two ops against the eager chain users run today (`make bench` until the benchmark
suite lands). On a machine without a GPU it measures the reference path on the CPU, not the kernels."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import fastpeft


def median_ms(fn, repeats=20):
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"fastpeft {fastpeft.__version__} on {device} ({dtype}); kernels: "
          f"{'yes' if device == 'cuda' and fastpeft.extension_loaded() else 'no: reference path'}")
    n, d, r = (16384, 4096, 64) if device == "cuda" else (2048, 768, 64)
    x, h = (torch.randn(n, d, device=device, dtype=dtype) for _ in range(2))
    w_down = torch.randn(r, d, device=device, dtype=dtype) * 0.02
    w_up = torch.randn(d, r, device=device, dtype=dtype) * 0.02

    def eager():
        return h + 4.0 * F.linear(F.relu(F.linear(x, w_down)), w_up)

    fused = median_ms(lambda: fastpeft.adapter(x, h, w_down, w_up, scale=4.0, activation="relu"))
    print(f"adapter   N={n} d={d} r={r}: fastpeft {fused:.3f} ms, eager chain {median_ms(eager):.3f} ms")

    b, heads, t, dim, length = (8, 16, 2048, 64, 30) if device == "cuda" else (2, 4, 256, 64, 30)
    q, k, v = (torch.randn(b, heads, t, dim, device=device, dtype=dtype) for _ in range(3))
    pk, pv = (torch.randn(heads, length, dim, device=device, dtype=dtype) for _ in range(2))

    def concat():
        keys = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
        values = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
        return F.scaled_dot_product_attention(q, keys, values)

    fused = median_ms(lambda: fastpeft.prefix_attention(q, k, v, pk, pv))
    print(f"prefix    B={b} H={heads} T={t} D={dim} L={length}: fastpeft {fused:.3f} ms, "
          f"concatenation + SDPA {median_ms(concat):.3f} ms")


if __name__ == "__main__":
    main()
