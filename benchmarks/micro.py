"""Measuring one op in the three modes of a training step (Liger-Kernel's convention):

- forward: the op with autograd recording (inputs and trainable weights require grad), output dropped;
- backward: `out.backward(dy)`, the forward that built `out` run untimed just before (on a GPU the timing events
  sit between the two in stream order, so only the backward is counted);
- full: forward then backward.

Gradients are set to None (untimed) before every call, so no call pays for accumulating into an earlier one.
Peak memory is measured over one more call, relative to what was allocated before it (inputs, weights and, for
backward, the graph): what the call itself adds at its peak.
A subject (`micro_adapter`, `micro_prefix`) describes its cases and builds an `Op` per (case, provider).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from fastpeft import FastPeftFallbackWarning

from benchmarks import harness
from fastpeft import _notice  # the one-time fallback notices, reset per measurement to catch each one

MODES = ("forward", "backward", "full")


@dataclass
class Op:
    """One provider's implementation of one case.

    fn(*inputs) computes the output from one input set; make_inputs() draws a fresh input set (the tensors that
    rotate); params are the trainable weights fn closes over (shared by all sets; their grads are reset too).
    """

    fn: Callable[..., Tensor]
    make_inputs: Callable[[], tuple]
    params: list = field(default_factory=list)


def measure(op: Op, mode: str, device: torch.device, timer: harness.Timer) -> dict:
    """Times `op` in `mode`; returns {"ms": spread, "peak_memory_mb", "rotation", "fallback"}."""
    first = op.make_inputs()
    set_bytes = sum(t.nbytes for t in first if isinstance(t, Tensor))
    limit = 64 if device.type == "cuda" else 16
    sets = [first] + [op.make_inputs() for _ in range(harness.rotation_count(set_bytes, device, limit=limit) - 1)]
    count = len(sets)
    leaves = [t for s in sets for t in s if isinstance(t, Tensor) and t.requires_grad] + list(op.params)

    def clear():
        for t in leaves:
            t.grad = None

    # The first call compiles (torch.compile) and shows any fallback notice; it is never timed.
    _notice.reset_notices()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = op.fn(*sets[0])
        dys = [torch.randn_like(out) for _ in range(count)]
        out.backward(dys[0])
    fallback = _fallback_message(caught)
    del out

    graph: dict = {}  # backward mode: the forward of call i, built untimed by before(i)

    def before(i):
        clear()
        if mode == "backward":
            graph["out"] = op.fn(*sets[i % count])

    if mode == "forward":
        def call(i):
            op.fn(*sets[i % count])
    elif mode == "backward":
        def call(i):
            graph.pop("out").backward(dys[i % count])
    elif mode == "full":
        def call(i):
            op.fn(*sets[i % count]).backward(dys[i % count])
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")

    times = timer.measure(call, device, before=before)
    peak_mb = None
    if device.type == "cuda":  # PyTorch keeps no allocation statistics on the CPU
        before(0)
        with harness.PeakMemory(device) as peak:
            call(0)
        peak_mb = peak.relative_mb
    clear()
    return {"ms": harness.spread(times), "peak_memory_mb": peak_mb, "rotation": count, "fallback": fallback}


def _fallback_message(caught) -> Optional[str]:
    messages = [str(w.message) for w in caught if issubclass(w.category, FastPeftFallbackWarning)]
    return "; ".join(messages) if messages else None


def derived(record: dict, work: dict, ceilings: dict) -> dict:
    """Achieved bandwidth and FLOP rate from the minimal bytes and useful FLOPs of the case, and their fractions
    of the measured ceilings."""
    ms = record["ms"]["p50"]
    gbps = work["bytes"] / ms / 1e6
    tflops = work["flops"] / ms / 1e9
    return {
        "bytes": work["bytes"],
        "flops": work["flops"],
        "gbps": gbps,
        "tflops": tflops,
        "frac_copy_bw": gbps / ceilings["copy_gbps"],
        "frac_matmul": tflops / ceilings["matmul_tflops"],
    }
