"""The GPU wheel, end to end (slow; `make test-wheel`, never in `make test`).

Builds the wheel for two architectures with tools/wheel.py (sdist, wheel from the sdist, auditwheel repair), then:
checks its name, requirements and what it vendors; installs it into a fresh virtual environment with the pinned
torch and checks the architectures embedded in the installed extension (cuobjdump), `python -m fastpeft.info`, and
the CPU test suite run against the installed package (not the source tree); installs it beside another torch and
checks the message and the fallback; installs the sdist with and without a usable CUDA toolchain.

Needs the CUDA toolkit (CUDA_HOME, default /usr/local/cuda) and the wheel tools (requirements/wheel.txt).
"""

from __future__ import annotations

import glob
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH_LIST = os.environ.get("FASTPEFT_TEST_WHEEL_ARCH_LIST", "8.0;9.0")
SDIST_ARCH_LIST = "9.0"  # the sdist-with-toolkit install compiles once more: one architecture is enough
OTHER_TORCH = "2.13.0"  # a CPU build of it lies on this machine's disk (pip finds it without a download)
CUDA_HOME = os.environ.get("CUDA_HOME") or "/usr/local/cuda"


def _load_wheel_tool():
    spec = importlib.util.spec_from_file_location("wheel_tool", os.path.join(ROOT, "tools", "wheel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wheel_tool = _load_wheel_tool()
compat = wheel_tool.load_compat()


def run(command, *, cwd=None, env=None, check=True):
    """Run a command with PYTHONPATH cleared (nothing from the source tree may leak in); return the result."""
    env = dict(os.environ if env is None else env)
    env.pop("PYTHONPATH", None)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


class Venv:
    """A fresh virtual environment in a temporary directory (removed after the module's tests)."""

    def __init__(self, path):
        self.path = str(path)
        run([sys.executable, "-m", "venv", self.path])
        self.python = os.path.join(self.path, "bin", "python")
        self.site_packages = run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()

    def pip(self, *args, env=None):
        return run([self.python, "-m", "pip", "--disable-pip-version-check", "--quiet", *args], env=env)

    def py(self, *args, cwd, env=None, check=True):
        """Run this environment's python with -P (the working directory is not put on sys.path)."""
        return run([self.python, "-P", *args], cwd=cwd, env=env, check=check)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Build the wheel for ARCH_LIST with tools/wheel.py; its record (paths, sizes, times, architectures)."""
    assert os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")), (
        f"the wheel test needs the CUDA toolkit: expected nvcc at {CUDA_HOME}/bin/nvcc (set CUDA_HOME)"
    )
    assert torch.version.cuda is not None, f"the wheel test needs a CUDA build of torch, got {torch.__version__}"
    out = tmp_path_factory.mktemp("wheel")
    record = out / "record.json"
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=ARCH_LIST, CUDA_HOME=CUDA_HOME)
    command = [sys.executable, os.path.join(ROOT, "tools", "wheel.py"), "build", "--outdir", str(out / "wheelhouse"),
               "--sdist-dir", str(out / "dist"), "--record", str(record)]
    result = run(command, env=env, check=False)
    print(result.stdout[-3000:])  # the summary: build time, sizes, architectures (shown with -s / -rA)
    assert result.returncode == 0, f"tools/wheel.py build failed:\n{result.stdout[-8000:]}\n{result.stderr[-8000:]}"
    return json.loads(record.read_text())


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory, built):
    """A fresh venv with the wheel and its dependencies, pinned like the test environment (torch 2.14.1)."""
    venv = Venv(tmp_path_factory.mktemp("venv-wheel") / "venv")
    # pytest and setuptools for the test suite; ninja for the sdist build. -c: the versions requirements/test.txt pins.
    venv.pip("install", built["wheel"], "pytest", "setuptools", "ninja", "-c", os.path.join(ROOT, "requirements", "test.txt"))
    yield venv
    shutil.rmtree(venv.path)  # 5 GB of torch and CUDA libraries


@pytest.fixture
def wheel_installed(wheel_venv, built):
    """wheel_venv with the built wheel installed (again: another test may have replaced it)."""
    wheel_venv.pip("install", "--no-deps", "--force-reinstall", built["wheel"])
    return wheel_venv


@pytest.fixture(scope="module")
def other_torch_venv(tmp_path_factory):
    """A fresh venv with another torch (OTHER_TORCH, a CPU build) and fastpeft's other dependencies."""
    venv = Venv(tmp_path_factory.mktemp("venv-other-torch") / "venv")
    venv.pip("install", f"torch=={OTHER_TORCH}", "numpy==2.4.6", "safetensors==0.8.0", "setuptools==84.2.1")
    yield venv
    shutil.rmtree(venv.path)


def test_wheel_name_version_and_requirements(built):
    tag = compat.local_version_tag(torch.__version__, torch.version.cuda)
    assert built["version"].endswith("+" + tag), f"version {built['version']} should carry +{tag}"
    name = os.path.basename(built["wheel"])
    assert re.fullmatch(
        rf"fastpeft-{re.escape(built['version'])}-cp3\d+-cp3\d+-manylinux_2_\d+_x86_64\.whl", name
    ), f"expected a repaired manylinux wheel named for {built['version']}, got {name}"
    assert f"torch=={compat.major_minor(torch.__version__)}.*" in built["requires_dist"], built["requires_dist"]
    assert built["problems"] == [], built["problems"]


def test_wheel_vendors_no_torch_or_cuda_library(built):
    """The extension needs torch's and CUDA's libraries (so the exclusions matter), and the wheel carries none."""
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    with zipfile.ZipFile(built["wheel"]) as archive:
        so_name = next(n for n in archive.namelist() if re.match(r"^fastpeft/_C\..*\.so$", n))
        with archive.open(so_name) as f:
            elf = ELFFile(io.BytesIO(f.read()))
            needed = {t.needed for s in elf.iter_sections() if isinstance(s, DynamicSection)
                      for t in s.iter_tags() if t.entry.d_tag == "DT_NEEDED"}
    cuda_major = torch.version.cuda.split(".")[0]
    for library in ("libc10.so", "libtorch_cpu.so", f"libcudart.so.{cuda_major}"):
        assert library in needed, f"expected fastpeft._C to link {library}, it links {sorted(needed)}"
    assert wheel_tool.forbidden_libraries(built["wheel"]) == []
    assert wheel_tool.vendored_libraries(built["wheel"]) == [], "a library was vendored: review it before shipping"


def test_installed_extension_has_exactly_the_requested_architectures(wheel_installed):
    extensions = [f for f in os.listdir(os.path.join(wheel_installed.site_packages, "fastpeft")) if f.startswith("_C.")]
    assert len(extensions) == 1, f"expected one fastpeft/_C.*.so in the venv, found {extensions}"
    found = wheel_tool.embedded_architectures(os.path.join(wheel_installed.site_packages, "fastpeft", extensions[0]))
    expected = compat.parse_arch_list(ARCH_LIST)  # "8.0;9.0" -> sm_80, sm_90, no PTX
    assert sorted(found) == sorted(expected), f"asked for {expected}, the installed extension holds {sorted(found)}"
    cu_files = glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
    kernel_files = {os.path.basename(p)[: -len(".cu")] for p in cu_files}
    for target, files in found.items():
        assert files == kernel_files, f"{target}: expected code from every .cu file {sorted(kernel_files)}, got {sorted(files)}"


def test_installed_wheel_imports_and_reports_its_build(wheel_installed, built, tmp_path):
    where = wheel_installed.py("-c", "import fastpeft; print(fastpeft.__file__)", cwd=tmp_path).stdout.strip()
    assert where.startswith(wheel_installed.site_packages), f"fastpeft imported from {where}, not the venv"
    wheel_installed.pip("check")  # the wheel's torch pin is satisfied by the torch installed beside it
    info = json.loads(wheel_installed.py("-m", "fastpeft.info", "--json", cwd=tmp_path).stdout)
    assert info["extension_built"] is True, info["extension_load_error"]
    assert info["installed_version"] == built["version"]
    build = info["build"]
    assert build["arch_list"] == ARCH_LIST
    assert build["architectures"] == compat.parse_arch_list(ARCH_LIST)
    assert build["torch_version"] == info["torch_version"] == torch.__version__
    assert build["package_version"] == built["version"]
    head = run(["git", "rev-parse", "HEAD"], cwd=ROOT).stdout.strip()
    assert build["git_commit"] in (head, head + "-dirty"), f"recorded commit {build['git_commit']}, HEAD is {head}"
    text = wheel_installed.py("-m", "fastpeft.info", cwd=tmp_path).stdout
    assert f"(installed as {built['version']})" in text and "code for: " + ", ".join(build["architectures"]) in text


def test_cpu_suite_passes_against_the_installed_wheel(wheel_installed, tmp_path):
    """The repository's tests (not the slow ones; not tests/models, which need transformers; not the benchmark
    suite's smoke test, since `benchmarks/` is the repository's, not the wheel's) with the installed package: run
    from a scratch directory with -P, so `import fastpeft` cannot find the source tree."""
    env = dict(os.environ, FASTPEFT_EXPECT_EXTENSION="1", FASTPEFT_EXPECT_INSTALLED_IN=wheel_installed.site_packages)
    command = ["-m", "pytest", "-q", "-rp", "-p", "no:cacheprovider", "-c", os.path.join(ROOT, "pyproject.toml"),
               "--rootdir", ROOT, os.path.join(ROOT, "tests"), "--ignore", os.path.join(ROOT, "tests", "models"),
               "--ignore", os.path.join(ROOT, "tests", "test_benchmarks.py")]
    result = wheel_installed.py(*command, cwd=tmp_path, env=env, check=False)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, f"the suite failed against the wheel:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 50 and "failed" not in summary, summary
    # The two tests that prove what was tested ran and passed (-rp lists the passed tests).
    for test in ("test_tested_package_is_the_installed_one", "test_extension_built_when_expected"):
        assert re.search(rf"^PASSED \S*tests/test_build.py::{test}$", result.stdout, flags=re.M), (
            f"{test} did not pass:\n{result.stdout[-6000:]}"
        )


_IMPORT_REPORT = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastpeft
import torch
x, h = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
wd, wu = torch.randn(2, 8, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
y = fastpeft.adapter(x, h, wd, wu, scale=0.5, activation="relu")
expected = h + 0.5 * (torch.relu(x @ wd.T) @ wu.T)
print(json.dumps({
    "warnings": [[w.category.__name__, str(w.message)] for w in caught],
    "loaded": fastpeft.extension_loaded(),
    "load_error": fastpeft._extension.LOAD_ERROR,
    "adapter_matches": bool(torch.allclose(y, expected)),
}))
"""


_METADATA = """
import importlib.metadata, json
print(json.dumps({"version": importlib.metadata.version("fastpeft"), "requires": importlib.metadata.requires("fastpeft")}))
"""


def test_wheel_beside_another_torch_warns_and_falls_back(other_torch_venv, built, tmp_path):
    other_torch_venv.pip("install", "--no-deps", "--force-reinstall", built["wheel"])
    report = json.loads(other_torch_venv.py("-c", _IMPORT_REPORT, cwd=tmp_path).stdout)
    built_torch = built["build_info"]["torch_version"]
    assert report["loaded"] is False and report["adapter_matches"] is True
    assert [w[0] for w in report["warnings"]] == ["FastPeftFallbackWarning"], report["warnings"]
    message = report["warnings"][0][1]
    for part in (f"built for torch {built_torch}", f"torch {OTHER_TORCH}", "reference path", "not loaded"):
        assert part in message, f"{part!r} missing from the warning: {message}"

    # Without its build record the binary is loaded for real: the dynamic loader's failure becomes the message.
    os.remove(os.path.join(other_torch_venv.site_packages, "fastpeft", "_build_info.json"))
    report = json.loads(other_torch_venv.py("-c", _IMPORT_REPORT, cwd=tmp_path).stdout)
    assert report["loaded"] is False and report["adapter_matches"] is True
    message = report["warnings"][0][1]
    assert f"failed to load into torch {OTHER_TORCH}" in message and "reference path" in message, message
    assert re.search(r"cannot open shared object file|undefined symbol", message), message


def test_sdist_installs_pure_python_without_a_cuda_toolchain(other_torch_venv, built, tmp_path):
    """A CPU build of torch cannot build the extension: the sdist installs the pure-Python package, untagged."""
    other_torch_venv.pip("install", "--no-build-isolation", "--no-deps", "--force-reinstall", built["sdist"])
    package = os.path.join(other_torch_venv.site_packages, "fastpeft")
    assert not [f for f in os.listdir(package) if f.startswith("_C.") or f == "_build_info.json"], os.listdir(package)
    report = json.loads(other_torch_venv.py("-c", _IMPORT_REPORT, cwd=tmp_path).stdout)
    assert report["warnings"] == [] and report["loaded"] is False and report["adapter_matches"] is True
    assert "not installed (a pure-Python build" in report["load_error"]
    metadata = json.loads(other_torch_venv.py("-c", _METADATA, cwd=tmp_path).stdout)
    assert metadata["version"] == built["build_info"]["version"], f"expected the plain version: {metadata}"
    assert "torch>=2.6" in metadata["requires"], metadata


def test_sdist_builds_the_extension_with_a_cuda_toolchain(wheel_venv, built, tmp_path):
    """With torch's CUDA build and nvcc, pip builds the extension from the sdist, keeping the sdist's plain version
    (pip compares it with the index) and pinning the torch it was built against."""
    env = dict(os.environ, CUDA_HOME=CUDA_HOME, TORCH_CUDA_ARCH_LIST=SDIST_ARCH_LIST,
               PATH=os.path.dirname(wheel_venv.python) + os.pathsep + os.environ["PATH"])
    env.pop("FASTPEFT_LOCAL_VERSION", None)
    wheel_venv.pip("install", "--no-build-isolation", "--no-deps", "--force-reinstall", built["sdist"], env=env)
    metadata = json.loads(wheel_venv.py("-c", _METADATA, cwd=tmp_path).stdout)
    assert metadata["version"] == built["build_info"]["version"], f"expected the sdist's plain version: {metadata}"
    assert f"torch=={compat.major_minor(torch.__version__)}.*" in metadata["requires"], metadata
    info = json.loads(wheel_venv.py("-m", "fastpeft.info", "--json", cwd=tmp_path).stdout)
    assert info["extension_built"] is True, info["extension_load_error"]
    assert info["build"]["arch_list"] == SDIST_ARCH_LIST
