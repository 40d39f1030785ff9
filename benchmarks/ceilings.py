"""The machine's measured ceilings, taken first in every run: copy bandwidth and matrix-multiply rate.

- Copy: `dst.copy_(src)` over a buffer far larger than the last-level cache; bandwidth counts bytes read plus bytes
  written.
- Matmul: one square matrix product, 2 n^3 floating-point operations; bf16 on a GPU, fp32 on the CPU.

Each micro record reports its achieved bandwidth and FLOP rate as fractions of these two numbers.
"""

from __future__ import annotations

import torch

from benchmarks import harness


def measure(device: torch.device, quick: bool, timer: harness.Timer) -> list[dict]:
    """The two ceiling records (subject "ceiling", provider "torch")."""
    records = []
    gpu = device.type == "cuda"
    # 1 GiB each way on a GPU (20x an H100's L2); on the CPU 256 MiB (64 MiB quick), beyond any L3.
    copy_bytes = (1 << 30) if gpu else ((64 << 20) if quick else (256 << 20))
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    times = timer.measure(lambda i: dst.copy_(src), device)
    stats = harness.spread(times)
    moved = 2 * copy_bytes
    records.append(_record("copy", {"bytes": copy_bytes}, "float32", stats, bytes_moved=moved,
                           gbps=moved / stats["p50"] / 1e6))
    del src, dst

    n = 8192 if gpu else (512 if quick else 2048)
    dtype = torch.bfloat16 if gpu else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    times = timer.measure(lambda i: torch.mm(a, b, out=out), device)
    stats = harness.spread(times)
    flops = 2 * n**3
    records.append(_record("matmul", {"n": n}, str(dtype).replace("torch.", ""), stats, flops=flops,
                           tflops=flops / stats["p50"] / 1e9))
    return records


def _record(case, shape, dtype, stats, **metrics) -> dict:
    return {"subject": "ceiling", "case": case, "method": case, "mode": "forward", "provider": "torch",
            "status": "ok", "shape": shape, "dtype": dtype, "ms": stats, **metrics}


def as_dict(records: list[dict]) -> dict:
    """{"copy_gbps": ..., "matmul_tflops": ...} from the ceiling records."""
    values = {r["case"]: r for r in records}
    return {"copy_gbps": values["copy"]["gbps"], "matmul_tflops": values["matmul"]["tflops"]}
