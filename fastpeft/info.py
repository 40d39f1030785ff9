"""`python -m fastpeft.info`: how this fastpeft was built and whether its CUDA kernels can run here.

Prints the package version (and the installed distribution's, with its local tag like +cu130torch2.14), the
running torch and CUDA, how the extension was built (torch, CUDA, nvcc, architectures, git commit) or why it did
not load, the visible GPU and whether the binary has code for it, and whether the kernels are available right now.
`--json` prints the same as JSON.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
from typing import Optional

import torch

from fastpeft import _compat, _extension
from fastpeft._version import __version__


def installed_version() -> Optional[str]:
    """The installed distribution's version (with its local tag), or None when fastpeft runs from a source tree."""
    try:
        return importlib.metadata.version("fastpeft")
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    """Everything `python -m fastpeft.info` reports, as a dict."""
    build = _extension.build_info()
    if build is not None:
        build["architectures"] = _compat.parse_arch_list(build["arch_list"])
    gpu = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        gpu = {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
        if build is not None:
            gpu["kernel_image"] = dict(_extension._C.kernel_image(0))
    image_problem = _extension.device_problem(0) if build is not None and gpu is not None else None
    if not _extension.kernels_enabled():
        why_not = "disabled (FASTPEFT_DISABLE_KERNELS=1 or set_kernels_enabled(False))"
    elif build is None:
        why_not = f"the CUDA extension is not available ({_extension.LOAD_ERROR})"
    elif gpu is None:
        why_not = "no CUDA GPU is visible"
    elif torch.cuda.get_device_capability(0) < _extension.MIN_COMPUTE_CAPABILITY:
        why_not = f"the GPU is older than sm_{''.join(map(str, _extension.MIN_COMPUTE_CAPABILITY))}"
    elif image_problem:
        why_not = image_problem
    else:
        why_not = None
    return {
        "fastpeft_version": __version__,
        "installed_version": installed_version(),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "extension_built": build is not None,
        "extension_load_error": _extension.LOAD_ERROR,
        "build": build,
        "gpu": gpu,
        "kernels_available": why_not is None,
        "kernels_unavailable_reason": why_not,
    }


def format_report(info: dict) -> str:
    installed = info["installed_version"]
    lines = [f"fastpeft {info['fastpeft_version']}" + (f" (installed as {installed})" if installed else "")]
    lines.append(f"  running on torch {info['torch_version']} (CUDA {info['torch_cuda_version'] or 'none'})")
    build = info["build"]
    if build is None:
        lines.append(f"  CUDA extension: not loaded: {info['extension_load_error']}")
    else:
        lines.append(
            f"  CUDA extension: built with torch {build['torch_version']} (CUDA {build['torch_cuda_version']},"
            f" nvcc {build['nvcc_version']}) for TORCH_CUDA_ARCH_LIST={build['arch_list']!r},"
            f" commit {build['git_commit']}"
        )
        lines.append(f"    code for: {', '.join(build['architectures'])} (sm_XY: binary, compute_XY: PTX)")
    gpu = info["gpu"]
    if gpu is None:
        lines.append("  GPU: none")
    else:
        lines.append(f"  GPU: {gpu['name']} (compute capability {gpu['compute_capability']})")
        image = gpu.get("kernel_image")
        if image is not None and image["ok"]:
            lines.append(f"    the driver runs this binary's sm_{image['binary_version']} code on it")
    if info["kernels_available"]:
        lines.append("  CUDA kernels available now: yes")
    else:
        lines.append(f"  CUDA kernels available now: no ({info['kernels_unavailable_reason']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    print(json.dumps(info, indent=2) if "--json" in argv else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
