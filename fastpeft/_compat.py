"""Whether a compiled fastpeft extension fits the running torch and GPU: pure functions, no torch import.

`setup.py` uses `parse_arch_list` to validate TORCH_CUDA_ARCH_LIST; `fastpeft._extension` uses the rest to decide,
before loading `fastpeft._C` and before launching a kernel, whether the binary can run here, and to say why not.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

# One TORCH_CUDA_ARCH_LIST entry: "8.6", "9.0a" (arch-specific), "10.0f" (family), each optionally "+PTX".
_ARCH_ENTRY = re.compile(r"^(\d+)\.(\d)([af]?)(\+PTX)?$")


def parse_arch_list(arch_list: str) -> List[str]:
    """The compilation targets of a TORCH_CUDA_ARCH_LIST, in order: "8.0;9.0+PTX" -> ["sm_80", "sm_90", "compute_90"].

    `sm_XY` is a binary (cubin) for compute capability X.Y, `compute_XY` PTX that the driver compiles at load time.
    Entries are separated by ";" or spaces. Raises ValueError naming the entry when one is not "X.Y[a|f][+PTX]".
    """
    entries = [e for e in re.split(r"[;\s]+", arch_list.strip()) if e]
    if not entries:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST is empty; expected entries like '8.0;9.0+PTX', got {arch_list!r}")
    targets: List[str] = []
    for entry in entries:
        match = _ARCH_ENTRY.match(entry)
        if not match:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not of the form X.Y, X.Ya, X.Yf, optionally +PTX "
                f"(like '8.0;8.6;9.0+PTX'); got {arch_list!r}"
            )
        major, minor, suffix, ptx = match.groups()
        number = f"{major}{minor}{suffix}"
        for target in [f"sm_{number}"] + ([f"compute_{number}"] if ptx else []):
            if target not in targets:
                targets.append(target)
    return targets


def _target_runs_on(target: str, capability: Tuple[int, int]) -> bool:
    """Whether one compilation target can run on a GPU of `capability`, by CUDA's compatibility rules."""
    kind, number = target.split("_")
    suffix = number[-1] if number[-1] in "af" else ""
    digits = number[: len(number) - len(suffix)]
    major, minor = int(digits[:-1]), int(digits[-1])
    if suffix == "a":  # arch-specific (sm_90a): that exact GPU only
        return capability == (major, minor)
    if kind == "sm" or suffix == "f":  # binaries, and family targets: same major, same or newer minor
        return capability[0] == major and capability[1] >= minor
    return capability >= (major, minor)  # plain PTX: any newer GPU, compiled by the driver


def arch_problem(capability: Tuple[int, int], arch_list: str) -> Optional[str]:
    """None when a binary built for `arch_list` has code for a GPU of `capability`; else why not, naming both."""
    targets = parse_arch_list(arch_list)
    if any(_target_runs_on(t, capability) for t in targets):
        return None
    sm = f"sm_{capability[0]}{capability[1]}"
    return (
        f"the CUDA extension has no kernel image for this GPU ({sm}, compute capability "
        f"{capability[0]}.{capability[1]}): it was built for TORCH_CUDA_ARCH_LIST={arch_list!r} "
        f"({', '.join(targets)}); rebuild with TORCH_CUDA_ARCH_LIST=\"{capability[0]}.{capability[1]}\" to use the "
        f"kernels here"
    )


def major_minor(version: str) -> str:
    """"2.14.1+cu130" -> "2.14"; "13.0" -> "13.0"."""
    match = re.match(r"^(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"expected a version like '2.14.1', got {version!r}")
    return f"{match.group(1)}.{match.group(2)}"


def torch_problem(built: dict, torch_version: str, torch_cuda: Optional[str]) -> Optional[str]:
    """None when an extension built as `built` describes (keys torch_version, torch_cuda_version) can be loaded
    into torch `torch_version` with CUDA `torch_cuda` (None for a CPU build of torch); else why not, naming both.

    A CUDA extension links against torch's C++ library: another torch major.minor has other symbols (the load fails
    with "undefined symbol", or worse, succeeds and crashes later), and another CUDA major another runtime library.
    """
    built_torch, built_cuda = built["torch_version"], built["torch_cuda_version"]
    built_desc = f"torch {built_torch} (CUDA {built_cuda})"
    running_desc = f"torch {torch_version} (CUDA {torch_cuda or 'none: a CPU build'})"
    if major_minor(built_torch) != major_minor(torch_version):
        return f"the CUDA extension was built for {built_desc}, but {running_desc} is running"
    if torch_cuda is None:
        return f"the CUDA extension was built for {built_desc}, but {running_desc} is running, which has no CUDA"
    if built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
        return f"the CUDA extension was built for {built_desc}, but {running_desc} is running (another CUDA major)"
    return None


def local_version_tag(torch_version: str, torch_cuda: str) -> str:
    """The wheel's local version label: torch "2.14.1+cu130" with CUDA "13.0" -> "cu130torch2.14"."""
    return f"cu{torch_cuda.replace('.', '')}torch{major_minor(torch_version)}"
