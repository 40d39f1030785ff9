"""`python -m benchmarks [SUBJECT ...] [options]`: run the benchmark suite, write JSON lines, print tables.

Subjects: `adapter` and `prefix` (micro, the two ops), `e2e` (real models); all three by default. Every run first
measures the machine's ceilings (copy bandwidth, matmul rate).

Without a GPU the suite runs tiny sizes on the CPU, where fastpeft runs its reference path (plain PyTorch), not its
CUDA kernels: CPU numbers say nothing about the kernels. CPU and `--quick` results go to
`benchmarks/results/scratch/` (not committed) unless `--out` says otherwise; full GPU runs go to
`benchmarks/results/`.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import ceilings, e2e, e2e_models, harness, micro, micro_adapter, micro_prefix, plot, report

RESULTS = Path(__file__).resolve().parent / "results"
SUBJECTS = {"adapter": micro_adapter, "prefix": micro_prefix, "e2e": e2e}

CPU_NOTE = ("No GPU: these are CPU numbers at tiny sizes. On the CPU fastpeft runs its reference path (plain "
            "PyTorch), not its CUDA kernels, so they say nothing about the kernels.")


def timers(device: torch.device, quick: bool) -> dict:
    """How long each kind of measurement warms up and runs."""
    if device.type == "cuda":
        return {
            "ceiling": harness.Timer(warmup_ms=50, rep_ms=300, min_reps=10, min_warmup=3),
            "micro": harness.Timer(warmup_ms=25, rep_ms=100, min_reps=10, max_reps=1000, min_warmup=3),
            "e2e": harness.Timer(warmup_ms=0, rep_ms=100 if quick else 500, min_reps=5, max_reps=30, min_warmup=2),
        }
    return {
        "ceiling": harness.Timer(warmup_ms=5, rep_ms=50, min_reps=5, max_reps=50, min_warmup=2),
        "micro": harness.Timer(warmup_ms=2, rep_ms=20, min_reps=5, max_reps=100, min_warmup=2),
        "e2e": harness.Timer(warmup_ms=0, rep_ms=30, min_reps=3, max_reps=5, min_warmup=2),
    }


def _choices(text: str | None, allowed) -> list[str]:
    """The names of a comma-separated filter that `allowed` has, in `allowed`'s order (all of them for None)."""
    if text is None:
        return list(allowed)
    chosen = {c.strip() for c in text.split(",") if c.strip()}
    return [a for a in allowed if a in chosen]


def _check_filter(text: str | None, known, what: str) -> None:
    """A filter may name things of any subject (--method lora,causal), but nothing unknown to all of them."""
    unknown = sorted({c.strip() for c in (text or "").split(",") if c.strip()} - set(known))
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("subjects", nargs="*", metavar="SUBJECT", help=f"some of {', '.join(SUBJECTS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and short timings (always on the CPU)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--method", help="comma-separated methods to keep")
    parser.add_argument("--provider", help="comma-separated providers to keep")
    parser.add_argument("--mode", help="comma-separated micro modes: forward,backward,full")
    parser.add_argument("--model", help=f"comma-separated e2e models: {','.join(e2e_models.MODELS)}")
    parser.add_argument("--task", help=f"comma-separated e2e tasks: {','.join(e2e.TASKS)}")
    parser.add_argument("--out", type=Path, help="directory for the .jsonl files")
    parser.add_argument("--reps", type=int, help="time exactly this many calls per measurement, after one warm-up "
                        "call (smoke runs; default: as many as fit the time budget)")
    parser.add_argument("--plot", action="store_true", help="draw the plots of this run (python -m benchmarks.plot)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    _check_filter(",".join(args.subjects), SUBJECTS, "subject")
    args.subjects = _choices(",".join(args.subjects) if args.subjects else None, SUBJECTS)
    _check_filter(args.method, [m for s in SUBJECTS.values() for m in s.METHODS], "method")
    _check_filter(args.provider, [p for s in SUBJECTS.values() for p in s.PROVIDERS], "provider")
    _check_filter(args.mode, micro.MODES, "mode")
    _check_filter(args.model, e2e_models.MODELS, "model")
    _check_filter(args.task, e2e.TASKS, "task")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    quick = args.quick or not use_cuda
    dtype = torch.bfloat16 if use_cuda else torch.float32
    out = args.out or (RESULTS if use_cuda and not quick else RESULTS / "scratch")
    timer = timers(device, quick)
    if args.reps:
        reps = max(2, args.reps)
        timer = {k: harness.Timer(warmup_ms=0, rep_ms=0, min_reps=reps, max_reps=reps) for k in timer}

    run = harness.new_run(device)
    writer = harness.RecordWriter(out, run)
    env = run["env"]
    print(f"fastpeft benchmarks, run {run['run_id']}")
    print(f"  {env['gpu'] or env['cpu']} | torch {env['torch']} (CUDA {env['cuda']}) | transformers "
          f"{env['transformers']} | peft {env['peft']} | adapters {env['adapters']} | commit {env['git_commit']}"
          f"{' (dirty)' if env['git_dirty'] else ''}")
    print(f"  fastpeft kernels: {'yes' if env['kernels_usable'] else 'no (reference path)'}; dtype {dtype}; "
          f"{'quick sizes' if quick else 'full sizes'}")
    if not use_cuda:
        print(f"  {CPU_NOTE}")
    started = time.perf_counter()

    ceiling_records = [writer.write(r) for r in ceilings.measure(device, quick, timer["ceiling"])]
    ceil = ceilings.as_dict(ceiling_records)
    print(report.ceilings_line(ceil), "\n")

    for subject in args.subjects:
        if subject == "e2e":
            records = run_e2e(args, device, dtype, quick, timer["e2e"], writer)
        else:
            records = run_micro(SUBJECTS[subject], args, device, dtype, quick, timer["micro"], ceil, writer)
        print(report.table(records))
    print(f"records: {', '.join(str(p) for p in writer.paths.values())}")
    if args.plot:
        written = plot.plot(list(writer.paths.values()), out / "plots")
        print(f"plots: {len(written)} in {out / 'plots' / run['run_id']}")
    print(f"took {time.perf_counter() - started:.0f} s")
    if not use_cuda:
        print(CPU_NOTE)
    return 0


def _progress(total: int, label: str, args):
    return tqdm(total=total, desc=label, disable=True if args.no_progress else None, leave=False, file=sys.stderr)


def run_micro(module, args, device, dtype, quick, timer, ceil, writer) -> list[dict]:
    methods = _choices(args.method, module.METHODS)
    providers = _choices(args.provider, module.PROVIDERS)
    modes = _choices(args.mode, micro.MODES)
    cases = [c for c in module.cases(quick) if c["method"] in methods]
    jobs = [(c, p) for c in cases for p in module.providers(c["method"]) if p in providers]
    element = torch.empty(0, dtype=dtype).element_size()
    records = []
    with _progress(len(jobs) * len(modes), module.SUBJECT, args) as bar:
        for case in cases:
            case_records = []
            for provider in [p for c, p in jobs if c is case]:
                bar.set_postfix_str(f"{case['method']} {case['case']} {provider}")
                torch.manual_seed(0)  # every provider of a case gets the same weights
                op = None
                try:
                    op = module.build(case, provider, device, dtype)
                except Exception as error:  # noqa: BLE001 - reported in the record, the suite goes on
                    _report_error(case, provider, error)
                for mode in modes:
                    record = {"subject": module.SUBJECT, "case": case["case"], "method": case["method"],
                              "mode": mode, "provider": provider, "shape": case["shape"],
                              "dtype": str(dtype).replace("torch.", ""), "ceilings": ceil}
                    try:
                        if op is None:
                            raise RuntimeError("the provider could not be built for this case")
                        record.update(micro.measure(op, mode, device, timer), status="ok")
                        record.update(micro.derived(record, module.work(case, mode, provider, element), ceil))
                        if provider == "fastpeft":
                            record["kernels"] = bool(device.type == "cuda" and writer.run["env"]["kernels_usable"]
                                                     and not record["fallback"])
                    except Exception as error:  # noqa: BLE001
                        _report_error(case, provider, error)
                        record.update(harness.error_fields(error))
                    case_records.append(record)
                    bar.update()
                del op
                e2e.free_memory(device)
            harness.add_ratios(case_records, ("subject", "case", "method", "mode"))
            records.extend(writer.write(r) for r in case_records)
    return records


def run_e2e(args, device, dtype, quick, timer, writer) -> list[dict]:
    jobs = e2e.plan(_choices(args.model, e2e_models.MODELS), _choices(args.method, e2e.METHODS),
                    _choices(args.provider, e2e.PROVIDERS), _choices(args.task, e2e.TASKS),
                    quick)
    records = []
    with _progress(sum(len(tasks) for *_, tasks in jobs), "e2e", args) as bar:
        pending: list[dict] = []
        for index, (model, method, provider, tasks) in enumerate(jobs):
            bar.set_postfix_str(f"{model} {method} {provider}")
            pending.extend(e2e.run_job(model, method, provider, tasks, quick=quick, device=device, dtype=dtype,
                                       timer=timer))
            bar.update(len(tasks))
            last = index + 1 == len(jobs) or jobs[index + 1][:2] != (model, method)
            if last:  # every provider of this (model, method) is measured: ratios, then write
                harness.add_ratios(pending, ("subject", "model", "task", "method"))
                records.extend(writer.write(r) for r in pending)
                pending = []
    return records


def _report_error(case, provider, error):
    print(f"\n{provider} / {case['method']} / {case['case']} failed:", file=sys.stderr)
    traceback.print_exception(type(error), error, error.__traceback__, limit=-3, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
