"""The build tells the truth: the extension is there when it should be, and `python -m fastpeft.info` says so;
an extension that does not fit the running torch or GPU is refused with a message naming what it was built for;
setup.py tags and pins a CUDA build. All on the CPU (tests/test_wheel.py builds and installs real wheels)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import fastpeft
from fastpeft import _compat, _extension, info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TOOLKIT = torch.version.cuda is not None and os.path.exists(
    os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "bin", "nvcc")
)


def test_extension_built_when_expected():
    """`make test` sets FASTPEFT_EXPECT_EXTENSION=1 when a CUDA toolkit is present: then the build must have run."""
    if os.environ.get("FASTPEFT_EXPECT_EXTENSION") != "1":
        pytest.skip("FASTPEFT_EXPECT_EXTENSION is not 1 (no CUDA toolkit, or not run through make test)")
    assert fastpeft.extension_loaded(), f"fastpeft._C did not load: {_extension.LOAD_ERROR}"
    build = _extension.build_info()
    assert build["torch_version"] == torch.__version__
    assert build["version"] == fastpeft.__version__
    assert build["arch_list"], "no architectures recorded"
    assert _compat.parse_arch_list(build["arch_list"]), build["arch_list"]
    # The record the package reads before loading the binary says what the binary itself says.
    assert _extension.read_build_info_file(_extension._BUILD_INFO_PATH) == build
    # The kernels the CUDA paths call are registered with the dispatcher, for CUDA tensors.
    for op in ("adapter_shrink", "adapter_expand", "adapter_grad_z", "adapter_grad_x", "prefix_forward",
               "prefix_backward"):
        assert str(getattr(torch.ops.fastpeft_cuda, op).default._schema).startswith(f"fastpeft_cuda::{op}(")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastpeft_cuda::{op}", "CUDA"), op


def test_info_matches_the_running_state():
    report = info.collect()
    assert report["fastpeft_version"] == fastpeft.__version__
    assert report["torch_version"] == torch.__version__
    assert report["extension_built"] == fastpeft.extension_loaded()
    if not torch.cuda.is_available():
        assert report["gpu"] is None
        assert report["kernels_available"] is False
        assert report["kernels_unavailable_reason"]
    with fastpeft.disable_kernels():
        disabled = info.collect()
    assert disabled["kernels_available"] is False and "disabled" in disabled["kernels_unavailable_reason"]


def test_tested_package_is_the_installed_one():
    """tests/test_wheel.py runs this suite against an installed wheel and says where it is installed."""
    where = os.environ.get("FASTPEFT_EXPECT_INSTALLED_IN")
    if not where:
        pytest.skip("FASTPEFT_EXPECT_INSTALLED_IN is not set (not run by tests/test_wheel.py)")
    assert fastpeft.__file__.startswith(where), f"fastpeft was imported from {fastpeft.__file__}, not from {where}"
    assert not fastpeft.__file__.startswith(ROOT), fastpeft.__file__


def test_info_command_runs(tmp_path):
    # Run outside the source tree, so `python -m` imports the fastpeft under test (installed or editable).
    result = subprocess.run([sys.executable, "-m", "fastpeft.info"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"fastpeft {fastpeft.__version__}")
    assert "CUDA kernels available now:" in result.stdout
    if fastpeft.extension_loaded():
        code_for = ", ".join(_compat.parse_arch_list(_extension.build_info()["arch_list"]))
        assert f"code for: {code_for}" in result.stdout
    else:
        assert f"CUDA extension: not loaded: {_extension.LOAD_ERROR}" in result.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "fastpeft.info", "--json"], capture_output=True, text=True, cwd=tmp_path
    )
    assert json.loads(as_json.stdout)["extension_load_error"] == _extension.LOAD_ERROR


def test_kernel_switch():
    assert fastpeft.kernels_enabled()
    with fastpeft.disable_kernels():
        assert not fastpeft.kernels_enabled()
        assert not _extension.kernels_usable(torch.device("cuda", 0))
    assert fastpeft.kernels_enabled()
    assert not _extension.kernels_usable(torch.device("cpu"))


def _setup_py(env_overrides, *args):
    env = dict(os.environ, **env_overrides)
    return subprocess.run([sys.executable, "setup.py", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def test_setup_pure_python_when_asked():
    result = _setup_py({"FASTPEFT_BUILD_CUDA": "0"}, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == fastpeft.__version__
    assert "installing the pure-Python package without CUDA kernels (FASTPEFT_BUILD_CUDA=0)" in result.stderr


def test_setup_fails_loudly_when_cuda_is_required_but_missing():
    result = _setup_py({"FASTPEFT_BUILD_CUDA": "1", "CUDA_HOME": "/nonexistent-cuda"}, "--version")
    if torch.version.cuda is None:
        assert "has no CUDA support" in result.stderr
    assert result.returncode != 0
    assert "FASTPEFT_BUILD_CUDA=1 but the CUDA extension cannot be built" in result.stderr


def test_setup_rejects_bad_setting():
    result = _setup_py({"FASTPEFT_BUILD_CUDA": "yes"}, "--version")
    assert result.returncode != 0 and "must be 0, 1 or unset" in result.stderr


# --- which binaries fit which torch and GPU (pure functions) ---


def test_parse_arch_list():
    assert _compat.parse_arch_list("8.0;8.6;8.9;9.0+PTX") == ["sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]
    assert _compat.parse_arch_list(" 8.0 9.0a+PTX ") == ["sm_80", "sm_90a", "compute_90a"]
    assert _compat.parse_arch_list("10.0f;12.0") == ["sm_100f", "sm_120"]
    for bad in ("", "sm_90", "9", "9.0+ptx", "Hopper", "9.0;;9.x"):
        with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
            _compat.parse_arch_list(bad)


@pytest.mark.parametrize(
    "capability, arch_list, runs",
    [
        ((8, 0), "8.0;9.0", True),
        ((8, 6), "8.0;9.0", True),  # an sm_80 binary runs on any 8.x at or above 8.0
        ((8, 9), "8.6", True),
        ((8, 6), "8.9", False),  # not on an older minor
        ((9, 0), "8.0;8.6;8.9", False),  # nor on another major
        ((10, 0), "8.0;9.0", False),
        ((10, 0), "8.0;9.0+PTX", True),  # PTX is compiled by the driver for any newer GPU
        ((12, 0), "8.0;8.6;8.9;9.0+PTX", True),
        ((8, 9), "9.0+PTX", False),  # but not for an older one
        ((9, 0), "9.0a", True),
        ((10, 0), "9.0a+PTX", False),  # arch-specific code and PTX run on that exact GPU only
        ((10, 3), "10.0f", True),  # family code runs on the family's later members
        ((11, 0), "10.0f", False),
    ],
)
def test_arch_problem(capability, arch_list, runs):
    problem = _compat.arch_problem(capability, arch_list)
    if runs:
        assert problem is None, problem
    else:
        sm = f"sm_{capability[0]}{capability[1]}"
        assert problem and sm in problem and repr(arch_list) in problem, problem
        assert f'TORCH_CUDA_ARCH_LIST="{capability[0]}.{capability[1]}"' in problem, problem


def test_torch_problem():
    built = {"torch_version": "2.14.1+cu130", "torch_cuda_version": "13.0"}
    assert _compat.torch_problem(built, "2.14.1+cu130", "13.0") is None
    assert _compat.torch_problem(built, "2.14.0", "13.2") is None  # same major.minor, same CUDA major
    for running, cuda, says in [
        ("2.13.0+cu130", "13.0", "torch 2.13.0+cu130 (CUDA 13.0) is running"),
        ("2.15.0.dev20260101+cu130", "13.0", "torch 2.15.0.dev20260101+cu130"),
        ("2.14.1+cpu", None, "has no CUDA"),
        ("2.14.1+cu126", "12.6", "another CUDA major"),
    ]:
        problem = _compat.torch_problem(built, running, cuda)
        assert problem and "built for torch 2.14.1+cu130 (CUDA 13.0)" in problem and says in problem, problem


def test_local_version_tag():
    assert _compat.local_version_tag("2.14.1+cu130", "13.0") == "cu130torch2.14"
    assert _compat.local_version_tag("2.9.1", "12.8") == "cu128torch2.9"
    with pytest.raises(ValueError, match="expected a version"):
        _compat.major_minor("nightly")


# --- loading the extension: refused or failed loads become a message and the reference path ---

BUILT = {"torch_version": "2.14.1+cu130", "torch_cuda_version": "13.0", "arch_list": "8.0;9.0"}


def _importer(outcome):
    calls = []

    def import_module(name):
        calls.append(name)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return import_module, calls


def test_load_extension_refuses_another_torch_without_loading_it():
    import_module, calls = _importer(AssertionError("must not be imported"))
    module, error, warn = _extension.load_extension(import_module, BUILT, "2.13.0+cu130", "13.0")
    assert module is None and warn and calls == []
    for part in ("built for torch 2.14.1+cu130", "torch 2.13.0+cu130", "not loaded", "reference path", "wheel"):
        assert part in error, f"{part!r} missing: {error}"


def test_load_extension_explains_an_undefined_symbol():
    failure = ImportError("/x/fastpeft/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")
    import_module, calls = _importer(failure)
    module, error, warn = _extension.load_extension(import_module, BUILT, "2.14.1+cu130", "13.0")
    assert module is None and warn and calls == ["fastpeft._C"]
    for part in ("built for torch 2.14.1+cu130", "undefined symbol: _ZN3c10", "another torch", "reference path"):
        assert part in error, f"{part!r} missing: {error}"


def test_load_extension_pure_python_install_is_not_a_problem():
    missing = ModuleNotFoundError("No module named 'fastpeft._C'", name="fastpeft._C")
    module, error, warn = _extension.load_extension(_importer(missing)[0], None, "2.14.1+cu130", "13.0")
    assert module is None and not warn and "pure-Python" in error
    # Without a build record, a binary that is there but does not load is a problem, reported as such.
    module, error, warn = _extension.load_extension(
        _importer(ImportError("libc10_cuda.so: cannot open shared object file"))[0], None, "2.13.0+cpu", None
    )
    assert module is None and warn and "failed to load into torch 2.13.0+cpu (CUDA none)" in error


def test_load_extension_loads_a_fitting_build():
    sentinel = object()
    assert _extension.load_extension(_importer(sentinel)[0], BUILT, "2.14.1+cu130", "13.0") == (sentinel, None, False)


@pytest.mark.skipif(os.environ.get("FASTPEFT_EXPECT_EXTENSION") != "1", reason="needs the built extension")
def test_import_under_another_torch_warns_and_uses_the_reference_path(tmp_path):
    """The real import path: torch reports another version, so the built extension is refused with a warning."""
    script = """
import json, warnings
import torch
torch.__version__ = "2.13.0+cu130"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastpeft
x = torch.randn(2, 4)
y = fastpeft.adapter(x, x, torch.randn(2, 4), torch.randn(4, 2))
print(json.dumps({"loaded": fastpeft.extension_loaded(), "shape": list(y.shape),
                  "warnings": [[w.category.__name__, str(w.message)] for w in caught]}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loaded"] is False and report["shape"] == [2, 4]
    assert [w[0] for w in report["warnings"]] == ["FastPeftFallbackWarning"], report["warnings"]
    assert f"built for torch {torch.__version__}" in report["warnings"][0][1]


class _FakeExtension:
    """Stands in for fastpeft._C on a machine without a GPU: a build record and a scripted CUDA probe."""

    def __init__(self, arch_list, probe_error=None):
        self.arch_list, self.probe_error, self.probes = arch_list, probe_error, 0

    def build_info(self):
        return dict(BUILT, arch_list=self.arch_list)

    def kernel_image(self, device):
        self.probes += 1
        ok = self.probe_error is None
        return {"ok": ok, "error": self.probe_error, "message": "CUDA says no" if not ok else "no error",
                "binary_version": 90 if ok else 0, "ptx_version": 90 if ok else 0}


@pytest.mark.parametrize(
    "capability, arch_list, probe_error, usable, says",
    [
        ((8, 9), "8.0;9.0", None, True, None),
        ((12, 0), "8.0;9.0", None, False, "no kernel image for this GPU (sm_120"),
        ((9, 0), "9.0+PTX", "cudaErrorUnsupportedPtxVersion", False, "cudaErrorUnsupportedPtxVersion: CUDA says no"),
    ],
)
def test_kernels_unusable_on_a_gpu_the_binary_has_no_code_for(monkeypatch, capability, arch_list, probe_error,
                                                              usable, says):
    fake = _FakeExtension(arch_list, probe_error)
    monkeypatch.setattr(_extension, "_C", fake)
    monkeypatch.setattr(_extension, "_device_problems", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _extension.kernels_usable(torch.device("cuda", 0)) is usable
        assert _extension.kernels_usable(torch.device("cuda", 0)) is usable  # asked once, warned once
    messages = [str(w.message) for w in caught if issubclass(w.category, fastpeft.FastPeftFallbackWarning)]
    if usable:
        assert messages == [] and fake.probes == 1
    else:
        assert len(messages) == 1 and says in messages[0] and repr(arch_list) in messages[0], messages
        assert "reference path" in messages[0]


@pytest.mark.skipif(os.environ.get("FASTPEFT_EXPECT_EXTENSION") != "1", reason="needs the built extension")
def test_kernel_image_probe_reports_cuda_errors_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: tests/cuda covers the probe there")
    probe = fastpeft._extension._C.kernel_image(0)
    assert probe["ok"] is False and probe["error"].startswith("cudaError") and probe["message"], probe


# --- setup.py: version tag and torch pin (on a copy of the tree, so nothing here is rewritten) ---


def _setup_copy(tmp_path, sdist=False):
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    shutil.copytree(os.path.join(ROOT, "fastpeft"), tmp_path / "fastpeft",
                    ignore=shutil.ignore_patterns("*.so", "_build_info.json", "__pycache__"))
    if sdist:
        (tmp_path / "PKG-INFO").write_text("Metadata-Version: 2.4\nName: fastpeft\n")
    return tmp_path


def _egg_info(tree, env):
    """(version, requirements) that setup.py declares, from `setup.py egg_info` in `tree`."""
    result = subprocess.run([sys.executable, "setup.py", "-q", "egg_info"], capture_output=True, text=True,
                            cwd=tree, env=dict(os.environ, **env))
    assert result.returncode == 0, result.stderr
    pkg_info = (tree / "fastpeft.egg-info" / "PKG-INFO").read_text()
    version = next(line.split(": ", 1)[1] for line in pkg_info.splitlines() if line.startswith("Version: "))
    requires = (tree / "fastpeft.egg-info" / "requires.txt").read_text().split("\n\n")[0].split()
    return version, requires


def test_setup_pure_python_is_untagged_and_takes_any_recent_torch(tmp_path):
    version, requires = _egg_info(_setup_copy(tmp_path), {"FASTPEFT_BUILD_CUDA": "0"})
    assert version == fastpeft.__version__
    assert requires[0] == "torch>=2.6", requires


@pytest.mark.skipif(not HAS_TOOLKIT, reason="needs a CUDA build of torch and nvcc")
@pytest.mark.parametrize(
    "sdist, local_version, tagged",
    [(False, None, True), (False, "0", False), (True, None, False), (True, "1", True)],
)
def test_setup_cuda_build_tags_the_version_and_pins_torch(tmp_path, sdist, local_version, tagged):
    env = {"FASTPEFT_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0"}
    if local_version is not None:
        env["FASTPEFT_LOCAL_VERSION"] = local_version
    version, requires = _egg_info(_setup_copy(tmp_path, sdist=sdist), env)
    tag = _compat.local_version_tag(torch.__version__, torch.version.cuda)
    assert version == (f"{fastpeft.__version__}+{tag}" if tagged else fastpeft.__version__)
    assert requires[0] == f"torch=={_compat.major_minor(torch.__version__)}.*", requires
    assert glob.glob(str(tmp_path / "build" / "generated" / "fastpeft_build_info.h"))


def test_setup_rejects_bad_version_and_arch_settings(tmp_path):
    tree = _setup_copy(tmp_path)
    result = _setup_py({"FASTPEFT_LOCAL_VERSION": "yes"}, "--version")
    assert result.returncode != 0 and "FASTPEFT_LOCAL_VERSION must be 0, 1 or unset, got 'yes'" in result.stderr
    result = _setup_py({"FASTPEFT_BUILD_CUDA": "0", "FASTPEFT_LOCAL_VERSION": "1"}, "--version")
    assert result.returncode != 0 and "the extension is not being built" in result.stderr
    if HAS_TOOLKIT:
        result = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True, text=True, cwd=tree,
                                env=dict(os.environ, FASTPEFT_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="8.0;sm_90"))
        assert result.returncode != 0 and "entry 'sm_90' is not of the form X.Y" in result.stderr, result.stderr
