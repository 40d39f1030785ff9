"""`python -m fastpeft.info`: how this fastpeft was built and whether its CUDA kernels can run here.

Prints the package version, the running torch and CUDA, how the extension was built (torch, CUDA, architectures,
git commit), the visible GPU, and whether the kernels are available right now. `--json` prints the same as JSON.
"""

from __future__ import annotations

import json
import sys

import torch

from fastpeft import _extension
from fastpeft._version import __version__


def collect() -> dict:
    """Everything `python -m fastpeft.info` reports, as a dict."""
    gpu = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        gpu = {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    build = _extension.build_info()
    if not _extension.kernels_enabled():
        why_not = "disabled (FASTPEFT_DISABLE_KERNELS=1 or set_kernels_enabled(False))"
    elif build is None:
        why_not = f"the CUDA extension is not available ({_extension.LOAD_ERROR})"
    elif gpu is None:
        why_not = "no CUDA GPU is visible"
    elif not _extension.kernels_usable(torch.device("cuda", 0)):
        why_not = f"the GPU is older than sm_{''.join(map(str, _extension.MIN_COMPUTE_CAPABILITY))}"
    else:
        why_not = None
    return {
        "fastpeft_version": __version__,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "extension_built": build is not None,
        "build": build,
        "gpu": gpu,
        "kernels_available": why_not is None,
        "kernels_unavailable_reason": why_not,
    }


def format_report(info: dict) -> str:
    lines = [f"fastpeft {info['fastpeft_version']}"]
    lines.append(f"  running on torch {info['torch_version']} (CUDA {info['torch_cuda_version'] or 'none'})")
    build = info["build"]
    if build is None:
        lines.append("  CUDA extension: not built or not loadable (pure-Python install: reference path only)")
    else:
        lines.append(
            f"  CUDA extension: built with torch {build['torch_version']} (CUDA {build['torch_cuda_version']},"
            f" nvcc {build['nvcc_version']}) for TORCH_CUDA_ARCH_LIST={build['arch_list']!r},"
            f" commit {build['git_commit']}"
        )
    gpu = info["gpu"]
    lines.append(f"  GPU: {gpu['name']} (compute capability {gpu['compute_capability']})" if gpu else "  GPU: none")
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
