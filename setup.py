"""Build fastpeft: the pure-Python package, plus the CUDA extension `fastpeft._C` when a toolkit is present.

Environment variables (the only build settings):

  FASTPEFT_BUILD_CUDA     unset: build the extension when torch has CUDA and nvcc is found, else pure Python;
                          0: pure Python; 1: build the extension, and fail if it cannot be built.
  TORCH_CUDA_ARCH_LIST    architectures to compile for (default "8.0;8.6;8.9;9.0+PTX": Ampere, Ada, Hopper).
  MAX_JOBS                parallel compile jobs (ninja).
  FASTPEFT_PTXAS_VERBOSE  1: print ptxas' register and spill report for every kernel.
  FASTPEFT_GIT_COMMIT     commit recorded in the build when there is no .git directory (sdist builds).
  FASTPEFT_LOCAL_VERSION  unset: when the extension is built from a checkout, the version gets the local tag
                          "+cu<CUDA>torch<major.minor>" (like 0.1.0+cu130torch2.14); a build from an sdist keeps the
                          sdist's plain version, which pip checks against the index; 0: never tag; 1: always tag
                          (needs the extension). The sdist itself is never tagged.
  CUDA_HOME               the CUDA toolkit (torch's build helper looks there for nvcc).

With the extension, the package requires the torch major.minor it was built with (torch==2.14.*): the binary links
against that torch's C++ library. A source distribution (`sdist`) holds the sources only; it builds the extension
where it is installed. Host code is compiled without debug information (-g0), which keeps the wheel small.

No network, git or pip calls happen here: the commit is read from .git's files.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"
BUILD_INFO_JSON = "_build_info.json"


def load_source(relative_path: str) -> dict:
    """Run one of the package's dependency-free modules without importing the package (which needs torch)."""
    scope: dict = {}
    with open(os.path.join(ROOT, relative_path)) as f:
        exec(f.read(), scope)
    return scope


def read_version() -> str:
    return load_source(os.path.join("fastpeft", "_version.py"))["__version__"]


compat = load_source(os.path.join("fastpeft", "_compat.py"))  # parse_arch_list, major_minor, local_version_tag
BUILDING_SDIST = "sdist" in sys.argv[1:]


def git_commit() -> str:
    """The checked-out commit, read from .git without running git ("unknown" outside a checkout)."""
    if os.environ.get("FASTPEFT_GIT_COMMIT"):
        return os.environ["FASTPEFT_GIT_COMMIT"]
    git_dir = os.path.join(ROOT, ".git")
    if os.path.isfile(git_dir):  # a worktree: ".git" holds "gitdir: <path>"
        with open(git_dir) as f:
            git_dir = f.read().split(":", 1)[1].strip()
    try:
        with open(os.path.join(git_dir, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(" ", 1)[1]
        common = git_dir
        if os.path.isfile(os.path.join(git_dir, "commondir")):
            with open(os.path.join(git_dir, "commondir")) as f:
                common = os.path.join(git_dir, f.read().strip())
        for base in (git_dir, common):
            path = os.path.join(base, ref)
            if os.path.isfile(path):
                with open(path) as f:
                    return f.read().strip()
        with open(os.path.join(common, "packed-refs")) as f:
            for line in f:
                if line.rstrip().endswith(" " + ref):
                    return line.split(" ", 1)[0]
    except OSError:
        pass
    return "unknown"


def cuda_build_decision():
    """(build, reason): whether to build the CUDA extension, and why not when it is skipped."""
    mode = os.environ.get("FASTPEFT_BUILD_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        sys.exit(f"fastpeft: FASTPEFT_BUILD_CUDA must be 0, 1 or unset, got {mode!r}")
    if BUILDING_SDIST:
        return False, "a source distribution holds the sources; it builds the extension where it is installed"
    if mode == "0":
        return False, "FASTPEFT_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        reason = "torch is not importable at build time (build with --no-build-isolation to use an installed torch)"
    else:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} has no CUDA support"
        elif not nvcc or not os.path.exists(nvcc):
            reason = "no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)"
        else:
            return True, ""
    if mode == "1":
        sys.exit(f"fastpeft: FASTPEFT_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    return False, reason


def nvcc_version(cuda_home: str) -> str:
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    match = re.search(r"release (\d+\.\d+)", out.stdout)
    return match.group(1) if match else "unknown"


def package_version(build_cuda: bool) -> str:
    """The version, with the local tag naming CUDA and torch when FASTPEFT_LOCAL_VERSION asks for it (see the top)."""
    mode = os.environ.get("FASTPEFT_LOCAL_VERSION", "").strip()
    if mode not in ("", "0", "1"):
        sys.exit(f"fastpeft: FASTPEFT_LOCAL_VERSION must be 0, 1 or unset, got {mode!r}")
    from_sdist = os.path.exists(os.path.join(ROOT, "PKG-INFO"))
    if BUILDING_SDIST or mode == "0" or (mode == "" and (not build_cuda or from_sdist)):
        return read_version()
    if not build_cuda:
        sys.exit("fastpeft: FASTPEFT_LOCAL_VERSION=1 tags the version with the CUDA and torch of the extension, "
                 "but the extension is not being built")
    import torch

    return f"{read_version()}+{compat['local_version_tag'](torch.__version__, torch.version.cuda)}"


def install_requires(build_cuda: bool) -> list:
    """The extension runs only with the torch major.minor it was built with; the pure-Python package with any."""
    requires = ["numpy", "safetensors>=0.4"]
    if not build_cuda:
        return ["torch>=2.6"] + requires
    import torch

    return [f"torch=={compat['major_minor'](torch.__version__)}.*"] + requires


def build_info_values(arch_list: str, version: str) -> dict:
    """How the extension is built: compiled into it (header) and stored beside it (_build_info.json)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return {
        "version": read_version(),
        "package_version": version,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "nvcc_version": nvcc_version(CUDA_HOME),
        "arch_list": arch_list,
        "git_commit": git_commit(),
    }


def write_build_info(values: dict) -> str:
    """Generate the header the extension reports its build from, and the same as JSON (which the package reads
    before it loads the binary); returns the directory holding both."""
    out_dir = os.path.join(ROOT, "build", "generated")
    os.makedirs(out_dir, exist_ok=True)
    text = "#pragma once\n// Generated by setup.py; describes how this extension was built.\n"
    text += "".join(f'#define FASTPEFT_BUILD_{key.upper()} "{value}"\n' for key, value in values.items())
    write_if_changed(os.path.join(out_dir, "fastpeft_build_info.h"), text)
    write_if_changed(os.path.join(out_dir, BUILD_INFO_JSON), json.dumps(values, indent=2) + "\n")
    return out_dir


def write_if_changed(path: str, text: str) -> None:
    """Leave the file alone when unchanged, so ninja does not rebuild."""
    old = open(path).read() if os.path.exists(path) else None
    if old != text:
        with open(path, "w") as f:
            f.write(text)


def toolkit_header_fallbacks(cuda_home: str) -> list:
    """Header directories of torch's pip CUDA packages (nvidia/cu*/include), for toolkits without the math
    libraries' headers (cuBLAS, cuSPARSE) that ATen's CUDA headers include. Searched after every other directory."""
    import torch

    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site_packages, "nvidia", "cu*", "include")))


def cuda_extensions(version: str):
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    try:
        compat["parse_arch_list"](arch_list)
    except ValueError as error:
        sys.exit(f"fastpeft: {error}")
    generated = write_build_info(build_info_values(arch_list, version))
    csrc = os.path.join(ROOT, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    sources += sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
    cxx_flags = ["-O3", "-g0"] + [f"-idirafter{d}" for d in toolkit_header_fallbacks(CUDA_HOME)]
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("FASTPEFT_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    extension = CUDAExtension(
        name="fastpeft._C",
        sources=[os.path.relpath(s, ROOT) for s in sources],
        include_dirs=[csrc, generated],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )

    class BuildExtensionWithInfo(BuildExtension):
        """torch's build_ext, which also puts _build_info.json beside the built fastpeft._C."""

        def info_path(self) -> str:
            return os.path.join(os.path.dirname(self.get_ext_fullpath(extension.name)), BUILD_INFO_JSON)

        def run(self):
            super().run()
            shutil.copyfile(os.path.join(generated, BUILD_INFO_JSON), self.info_path())

        def get_outputs(self):
            return super().get_outputs() + [self.info_path()]

    print(f"fastpeft: building the CUDA extension for TORCH_CUDA_ARCH_LIST={arch_list!r}", file=sys.stderr)
    return [extension], {"build_ext": BuildExtensionWithInfo}


build_cuda, skip_reason = cuda_build_decision()
version = package_version(build_cuda)
if build_cuda:
    ext_modules, cmdclass = cuda_extensions(version)
else:
    print(f"fastpeft: installing the pure-Python package without CUDA kernels ({skip_reason})", file=sys.stderr)
    ext_modules, cmdclass = [], {}

setup(
    version=version,
    install_requires=install_requires(build_cuda),
    packages=find_packages(include=["fastpeft", "fastpeft.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
