"""The measuring harness every benchmark shares: timer, statistics, rotated inputs, peak memory, run metadata, records.

Timing rules (`../shared/GPU.md`):
- GPU: one pair of CUDA events around every call, all recorded back to back and read after one synchronisation
  (the method of `triton.testing.do_bench`); warm-up calls (at least `min_warmup`, more to fill `warmup_ms`),
  whose times size the number of timed calls to `rep_ms`, then the timed calls.
- CPU: `time.perf_counter` around every call (the same warm-up).
- Inputs rotate over enough copies that the copies together exceed the last-level cache several times over, so a
  small problem is never timed out of cache (`rotation_count`).
- Reported: the median (p50) and the spread (p20, p80) in milliseconds, and the number of timed calls.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Timer:
    """How long to warm up and to measure (milliseconds of the measured function), with bounds on the call count."""

    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 10
    max_reps: int = 1000
    min_warmup: int = 1

    def measure(self, call: Callable[[int], object], device: torch.device,
                before: Optional[Callable[[int], object]] = None) -> list[float]:
        """Times `call(i)` (i counts calls, for rotating inputs); `before(i)` runs untimed before every call.

        Returns the time of every timed call in milliseconds.
        """
        before = before or (lambda i: None)
        clock = _cuda_clock if device.type == "cuda" else _host_clock
        fns = [call, before]
        # The warm-up calls are timed too: their median (of the last three) sizes the rest to the budgets.
        warm = clock(fns, 0, self.min_warmup, device)
        estimate = max(statistics.median(warm[-3:]), 1e-4)
        extra = max(0, math.ceil(self.warmup_ms / estimate) - self.min_warmup)
        clock(fns, self.min_warmup, extra, device)
        reps = min(self.max_reps, max(self.min_reps, math.ceil(self.rep_ms / estimate)))
        return clock(fns, self.min_warmup + extra, reps, device)


def _host_clock(fns, start: int, count: int, device) -> list[float]:
    call, before = fns
    times = []
    for i in range(start, start + count):
        before(i)
        begin = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def _cuda_clock(fns, start: int, count: int, device) -> list[float]:
    call, before = fns
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    torch.cuda.synchronize(device)
    for k, i in enumerate(range(start, start + count)):
        before(i)
        starts[k].record()
        call(i)
        ends[k].record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def spread(times_ms: Iterable[float]) -> dict:
    """{"p20", "p50", "p80", "reps"} of a list of times (deciles, inclusive method)."""
    times = sorted(times_ms)
    if len(times) < 2:
        raise ValueError(f"need at least two timed calls, got {len(times)}")
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return {"p20": deciles[1], "p50": statistics.median(times), "p80": deciles[7], "reps": len(times)}


def cache_bytes(device: torch.device) -> int:
    """The last-level cache the rotation has to defeat: the GPU's L2, or the CPU's L3 (32 MiB if unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) << {"K": 10, "M": 20}[text[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return 32 << 20


def rotation_count(bytes_per_set: int, device: torch.device, factor: int = 4, limit: int = 64) -> int:
    """How many copies of the inputs to rotate over: enough for `factor` times the last-level cache."""
    return max(1, min(limit, math.ceil(factor * cache_bytes(device) / max(1, bytes_per_set))))


class PeakMemory:
    """Peak device memory allocated inside the `with` block, in MiB above what was allocated when it began
    (`relative`) or in total (`absolute`). None on the CPU: PyTorch keeps no allocation statistics there."""

    def __init__(self, device: torch.device):
        self.device = device
        self.relative_mb: Optional[float] = None
        self.absolute_mb: Optional[float] = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.absolute_mb = peak / 2**20
            self.relative_mb = (peak - self._base) / 2**20
        return False


# ----------------------------------------------------------------------------------------------------------------
# Run metadata and records
# ----------------------------------------------------------------------------------------------------------------


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed, or shadowed without metadata
        return None


def git_commit() -> tuple[str, Optional[bool]]:
    """(short commit, dirty) of the checkout; FASTPEFT_GIT_COMMIT overrides (a copy without .git)."""
    if os.environ.get("FASTPEFT_GIT_COMMIT"):
        return os.environ["FASTPEFT_GIT_COMMIT"], None
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        import fastpeft._extension as extension

        build = extension.build_info() or {}
        return str(build.get("git_commit") or "unknown"), None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """What a record must say about where it was measured."""
    import fastpeft
    from fastpeft import _extension

    commit, dirty = git_commit()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": device.type,
        "gpu": gpu,
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "adapters": _version("adapters"),
        "fastpeft": fastpeft.__version__,
        "extension_built": _extension.extension_loaded(),
        "kernels_usable": _extension.kernels_usable(device),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def new_run(device: torch.device) -> dict:
    """The run header: id, timestamp and environment, shared by every record of one invocation."""
    now = datetime.datetime.now(datetime.timezone.utc)
    env = environment(device)
    where = env["gpu"] or "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in where.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return {
        "run_id": f"{now:%Y%m%dT%H%M%SZ}-{slug[:32]}-{env['git_commit'][:8]}",
        "timestamp": now.isoformat(timespec="seconds"),
        "env": env,
    }


class RecordWriter:
    """Appends JSON-lines records of one run to `<out_dir>/<subject>-<run_id>.jsonl`."""

    def __init__(self, out_dir: Path, run: dict):
        self.out_dir = Path(out_dir)
        self.run = run
        self.paths: dict[str, Path] = {}

    def write(self, record: dict) -> dict:
        full = {"schema": SCHEMA_VERSION, "run_id": self.run["run_id"], "timestamp": self.run["timestamp"],
                **record, "env": self.run["env"]}
        subject = full["subject"]
        if subject not in self.paths:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.paths[subject] = self.out_dir / f"{subject}-{self.run['run_id']}.jsonl"
        with self.paths[subject].open("a") as handle:
            handle.write(json.dumps(full, sort_keys=False) + "\n")
        return full


def read_records(paths: Iterable[Path]) -> list[dict]:
    """Every record of the given .jsonl files (directories: every .jsonl directly inside)."""
    records = []
    for path in paths:
        path = Path(path)
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        for file in files:
            with file.open() as handle:
                records.extend(json.loads(line) for line in handle if line.strip())
    return records


def add_ratios(records: list[dict], key: tuple[str, ...]) -> None:
    """Sets `ratio_to_fastpeft` = p50 / p50 of the fastpeft record with the same `key` fields (same run), or None."""
    reference = {
        tuple(r.get(k) for k in key): r["ms"]["p50"]
        for r in records
        if r.get("status") == "ok" and r["provider"] == "fastpeft"
    }
    for r in records:
        base = reference.get(tuple(r.get(k) for k in key))
        r["ratio_to_fastpeft"] = r["ms"]["p50"] / base if (base and r.get("status") == "ok") else None


def error_fields(error: BaseException) -> dict:
    """The status and reason of a measurement that failed (out of memory, an exception in a provider)."""
    if isinstance(error, torch.OutOfMemoryError):
        return {"status": "error", "reason": "out of memory"}
    text = str(error).strip()
    message = text.splitlines()[0] if text else ""
    return {"status": "error", "reason": f"{type(error).__name__}: {message}"[:300]}
