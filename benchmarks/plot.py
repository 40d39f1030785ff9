"""`python -m benchmarks.plot [FILE_OR_DIR ...] [--out DIR]`: PNG plots drawn from benchmark records.

Reads JSON-lines records (default: the committed ones, `benchmarks/results/*.jsonl`) and draws, per run:
- micro (`adapter`, `prefix`), one figure per (subject, method, mode): the median time of every provider per case
  with its p20-p80 spread (log scale), and below it each provider's time relative to fastpeft's (same run);
- e2e, one figure per (model, task): the median time per call of every provider per method, with the spread.

Figures go to `<out>/<run_id>/` (default out: `benchmarks/results/plots`). Only records with status "ok" are drawn.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import harness  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _title(run: dict, what: str) -> str:
    env = run["env"]
    where = env["gpu"] or f"CPU ({env['cpu']})"
    title = f"{what}\n{where} | torch {env['torch']} | {run['timestamp'][:10]} | {env['git_commit']}"
    return title if env["gpu"] else title + "\nCPU: fastpeft runs its reference path here, not its CUDA kernels"


def _providers(records):
    order = []
    for r in records:
        if r["provider"] not in order:
            order.append(r["provider"])
    return order


def _grouped(ax, groups, providers, by, value, colors, log=False):
    """Grouped bars: one group per entry of `groups`, one bar per provider; value(record) -> (y, low, high)."""
    width = 0.8 / max(1, len(providers))
    for k, provider in enumerate(providers):
        xs, ys, lows, highs = [], [], [], []
        for g, group in enumerate(groups):
            record = by.get((group, provider))
            if record is None:
                continue
            y, low, high = value(record)
            xs.append(g + (k - (len(providers) - 1) / 2) * width)
            ys.append(y)
            lows.append(y - low)
            highs.append(high - y)
        if xs:
            ax.bar(xs, ys, width, label=provider, color=colors[provider], yerr=[lows, highs], capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    if log:
        ax.set_yscale("log")


def _spread(record):
    ms = record["ms"]
    return ms["p50"], ms["p20"], ms["p80"]


def plot_micro(run, records, out_dir) -> list[Path]:
    paths = []
    figures = defaultdict(list)
    for r in records:
        figures[(r["subject"], r["method"], r["mode"])].append(r)
    for (subject, method, mode), recs in sorted(figures.items()):
        cases = list(dict.fromkeys(r["case"] for r in recs))
        providers = _providers(recs)
        by = {(r["case"], r["provider"]): r for r in recs}
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 1.1 * len(cases) + 3), 7), sharex=True)
        colors = {p: f"C{k}" for k, p in enumerate(providers)}
        _grouped(top, cases, providers, by, _spread, colors, log=True)
        top.set_ylabel("median ms (p20-p80)")
        top.legend(fontsize=7)
        ratios = [r for r in recs if r.get("ratio_to_fastpeft") is not None and r["provider"] != "fastpeft"]
        by_ratio = {(r["case"], r["provider"]): r for r in ratios}
        others = [p for p in providers if p != "fastpeft"]
        _grouped(bottom, cases, others, by_ratio, lambda r: (r["ratio_to_fastpeft"],) * 3, colors)
        bottom.axhline(1.0, color="black", linewidth=0.8)
        bottom.set_ylabel("time / fastpeft's")
        fig.suptitle(_title(run, f"{subject} | {method} | {mode}"), fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out_dir, f"{subject}-{method}-{mode}.png"))
    return paths


def plot_e2e(run, records, out_dir) -> list[Path]:
    paths = []
    figures = defaultdict(list)
    for r in records:
        figures[(r["model"], r["task"])].append(r)
    for (model, task), recs in sorted(figures.items()):
        methods = list(dict.fromkeys(r["method"] for r in recs))
        providers = _providers(recs)
        by = {(r["method"], r["provider"]): r for r in recs}
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods) + 3), 4.5))
        _grouped(ax, methods, providers, by, _spread, {p: f"C{k}" for k, p in enumerate(providers)})
        ax.set_ylabel("median ms per call (p20-p80)")
        ax.legend(fontsize=7)
        fig.suptitle(_title(run, f"e2e | {model} | {task}"), fontsize=9)
        fig.tight_layout()
        paths.append(_save(fig, out_dir, f"e2e-{model}-{task}.png"))
    return paths


def _save(fig, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(paths, out: Path) -> list[Path]:
    """Draws every run found in `paths`; returns the PNG files written."""
    runs = defaultdict(list)
    for r in harness.read_records(paths):
        if r.get("status") == "ok":
            runs[r["run_id"]].append(r)
    written = []
    for run_id, records in sorted(runs.items()):
        run = records[0]
        out_dir = Path(out) / run_id
        written += plot_micro(run, [r for r in records if r["subject"] in ("adapter", "prefix")], out_dir)
        written += plot_e2e(run, [r for r in records if r["subject"] == "e2e"], out_dir)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", type=Path, default=[RESULTS], help=".jsonl files or directories")
    parser.add_argument("--out", type=Path, default=RESULTS / "plots", help="where the PNG files go")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise SystemExit(f"no such file or directory: {', '.join(missing)} (no benchmark records there yet?)")
    written = plot(args.paths, args.out)
    print(f"{len(written)} plots in {args.out}" if written else "no records with status ok: nothing to plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
