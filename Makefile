# Two entry points for a fresh machine: `make demo` and `make test`.
# Each uses the active virtualenv, or creates .venv here, installs torch==2.13.0 when torch is absent
# (the CPU wheel on our machines; set TORCH_SPEC to choose another), then installs ringattn editable.

VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

ifdef VIRTUAL_ENV
PYTHON := python
else
PYTHON := $(VENV)/bin/python
endif

# The editable install is redone only when what it builds from changes (Python edits need none).
ENV_DIR := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(VENV))
STAMP := $(ENV_DIR)/.ringattn-installed
BUILD_INPUTS := pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*)

.PHONY: setup test lint demo bench gpu-check compat sdist-smoke clean

setup: $(STAMP)
	@$(PYTHON) -c "import ringattn; print('ringattn extension:', ringattn.extension_status())"

$(STAMP): $(BUILD_INPUTS)
	@if [ -z "$$VIRTUAL_ENV" ] && [ ! -x $(VENV)/bin/python ]; then python3 -m venv $(VENV); fi
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[test,bench]"
	@touch $@

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: setup lint
	$(PYTHON) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PYTHON) -m ringattn.demo
	$(PYTHON) -m ringattn.examples.train --out bench_results/demo/train
	$(PYTHON) -m ringattn.bench all --quick --out bench_results/demo

bench: setup
	$(PYTHON) -m ringattn.bench all

# The install path a user takes, once per CI run (.ci/run): `python -m build --sdist` from this checkout,
# a new virtualenv outside the repository with $(TORCH_SPEC), a wheel built from the sdist (the
# extension must build: RINGATTN_REQUIRE_EXT=1; CUDA for one arch where nvcc exists), then the smoke
# (.ci/smoke.py), `python -m ringattn`, `ringattn-bench all --quick` and `ringattn-topology plan`.
# SMOKE_DIR keeps its files (default: a temporary folder, removed after a successful run).
sdist-smoke: setup
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" bash .ci/sdist_smoke.sh

# On a one-GPU machine with torch, triton, nvcc, cmake, ninja and pybind11 preinstalled (no network):
# build for the local arch, GPU tests, compute-sanitizer, GPU benchmarks; results and logs in $(OUT).
OUT ?= gpu_results
gpu-check:
	PYTHON=$(if $(VIRTUAL_ENV),python,python3) bash bench/gpu_check.sh $(OUT)

# Version ranges: GPU images ship Triton 3.6 (and torch 2.11), so every shipped Triton config must also
# AOT-compile under Triton 3.6. A separate venv ($(COMPAT_VENV)) gets COMPAT_TRITON and COMPAT_TORCH
# (torch 2.11 has no CPU wheel on PyPI, only the CUDA one with GBs of nvidia-* wheels: the default is
# the CPU torch of TORCH_SPEC) and ringattn installed, not editable, without the extension; pytest
# runs from inside that venv so the installed copy is imported. COMPAT_PYTEST picks the tests (absolute
# paths; default the AOT checks, slow tier included: every arch, head dim, dtype and variant). Not part of `make test`.
COMPAT_VENV ?= build/venv-compat
COMPAT_TRITON ?= triton==3.6.*
COMPAT_TORCH ?= $(TORCH_SPEC)
COMPAT_PYTEST ?= $(CURDIR)/tests/test_triton_aot.py -m "slow or not slow"
compat:
	@test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q "$(COMPAT_TORCH)" "$(COMPAT_TRITON)" "setuptools>=77" wheel numpy pytest
	RINGATTN_SKIP_EXT=1 $(COMPAT_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation --force-reinstall .
	@$(COMPAT_VENV)/bin/python -c "import torch, triton; print('compat: torch', torch.__version__, 'triton', triton.__version__)"
	cd $(COMPAT_VENV) && env -u TRITON_INTERPRET bin/python -m pytest -q -p no:cacheprovider --rootdir=$(CURDIR) $(COMPAT_PYTEST)

clean:
	rm -rf build dist *.egg-info ringattn/_C*.so ringattn/_C_status.json $(STAMP)
