"""`python -m benchmarks.summary [FILE_OR_DIR ...]`: the headline numbers of benchmark records, against the targets
of the kernel issues (3: adapter, 4: prefix attention), and the training throughput per model and method.

Informative only: a target not met is printed as such, never hidden and never an error. Targets are meant for bf16
on an H100 or H200; on any other device the lines still print, marked with the device.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import harness

RESULTS = Path(__file__).resolve().parent / "results"


def _find(records, **fields):
    return [r for r in records if r.get("status") == "ok" and all(r.get(k) == v for k, v in fields.items())]


def _worst(records, key, highest_is_worst=False):
    values = [key(r) for r in records if key(r) is not None]
    if not values:
        return None
    return max(values) if highest_is_worst else min(values)


def _line(what, value, target, ok, fmt="{:.2f}x"):
    if value is None:
        return f"  {what}: not measured"
    verdict = "met" if ok(value) else "NOT met"
    return f"  {what}: {fmt.format(value)} (target {target}: {verdict})"


def adapter_lines(records) -> list[str]:
    lines = []
    for method in ("parallel", "sequential"):
        at = dict(subject="adapter", method=method, case="N=16384 d=4096 r=64")
        fwd = _find(records, **at, mode="forward", provider="fastpeft")
        lines.append(_line(f"adapter {method} forward N=16k d=4096 r=64, fraction of copy bandwidth",
                           fwd[0]["frac_copy_bw"] if fwd else None, ">= 85%", lambda v: v >= 0.85, "{:.0%}"))
        for provider, target in (("eager", 1.5), ("compile", 1.15)):
            rec = _find(records, **at, mode="forward", provider=provider)
            ratio = rec[0]["ratio_to_fastpeft"] if rec else None
            lines.append(_line(f"adapter {method} forward N=16k d=4096 r=64, {provider} / fastpeft", ratio,
                               f">= {target}x", lambda v, t=target: v >= t))
        rec = _find(records, **at, mode="full", provider="eager")
        lines.append(_line(f"adapter {method} forward+backward N=16k d=4096 r=64, eager / fastpeft",
                           rec[0]["ratio_to_fastpeft"] if rec else None, ">= 1.3x", lambda v: v >= 1.3))
    worst = _worst(_find(records, subject="adapter", provider="eager"), lambda r: r["ratio_to_fastpeft"])
    lines.append(_line("adapter, every shape and mode: worst eager / fastpeft", worst, ">= 1.0x", lambda v: v >= 1.0))
    return lines


def prefix_lines(records) -> list[str]:
    def at_length(length, tokens=None):
        return [r for r in _find(records, subject="prefix", mode="full")
                if r["shape"]["L"] == length and (tokens is None or r["shape"]["T"] == tokens)]

    near_floor = _worst([r for r in at_length(30, 2048) if r["provider"] == "sdpa"],
                        lambda r: 1 / r["ratio_to_fastpeft"] if r["ratio_to_fastpeft"] else None, highest_is_worst=True)
    versus_concat = _worst([r for r in at_length(200) if r["provider"] == "concat"], lambda r: r["ratio_to_fastpeft"])
    memory = []
    for r in at_length(200):
        if r["provider"] == "concat" and r.get("peak_memory_mb"):
            mine = [f for f in at_length(200) if f["provider"] == "fastpeft" and f["case"] == r["case"]
                    and f["method"] == r["method"] and f.get("peak_memory_mb") is not None]
            memory += [mine[0]["peak_memory_mb"] / r["peak_memory_mb"]] if mine else []
    return [
        _line("prefix forward+backward L=30 T=2048, worst fastpeft / sdpa without prefix", near_floor, "<= 1.10x",
              lambda v: v <= 1.10),
        _line("prefix forward+backward L=200, worst concat / fastpeft", versus_concat, ">= 1.2x", lambda v: v >= 1.2),
        _line("prefix forward+backward L=200, worst peak memory fastpeft / concat", max(memory) if memory else None,
              "<= 1.0x", lambda v: v <= 1.0),
    ]


def e2e_lines(records) -> list[str]:
    lines = []
    groups = defaultdict(dict)
    for r in _find(records, subject="e2e", task="train"):
        groups[(r["model"], r["task"], r["method"])][r["provider"]] = r
    for (model, task, method), by in sorted(groups.items()):
        cells = []
        for provider, r in by.items():
            ratio = r.get("ratio_to_fastpeft")
            extra = f" ({ratio:.2f}x)" if ratio and provider != "fastpeft" else ""
            cells.append(f"{provider} {r['tokens_per_s']:,.0f} tok/s{extra}")
        lines.append(f"  {model} {task} {method}: " + ", ".join(cells))
    return lines


def summary(records) -> str:
    devices = sorted({r["env"]["gpu"] or "CPU (reference path)" for r in records})
    lines = [f"headline numbers ({', '.join(devices) or 'no records'}); ratios: time / fastpeft's, same run"]
    lines += adapter_lines(records) + prefix_lines(records)
    e2e = e2e_lines(records)
    if e2e:
        lines += ["end to end, training step (tokens/s; in parentheses the time / fastpeft's):"] + e2e
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, default=[RESULTS], help=".jsonl files or directories")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise SystemExit(f"no such file or directory: {', '.join(missing)} (no benchmark records there yet?)")
    print(summary(harness.read_records(args.paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
