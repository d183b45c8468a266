# Two commands on a fresh machine:  `make bench` (benchmark + verification report)  and  `make test`.
# Both create .venv on first use, install the package with its extension, then run.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: bench test lint install build clean gpu-check compat

bench: $(STAMP)
	$(VPY) -m bench $(BENCH_ARGS)

test: $(STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# ruff (lint + format check) over the repository, mypy over the kernels package
lint: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(VPY) -m mypy htsat_kernels

install: $(STAMP)

# torch first (its CUDA build can compile the CUDA half of the extension; on a machine without
# nvcc only the C++ CPU half is built), then the package in place with its test/bench extras.
# The original HTS-AT code (laion-clap's copy) is a test-only oracle, installed without its deps.
$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade setuptools wheel
	$(VPY) -m pip install -q torch ninja numpy
	$(VPY) -m pip install -q --no-build-isolation -e ".[test]" torchlibrosa
	$(VPY) -m pip install -q --no-deps laion-clap
	$(MAKE) build
	touch $(STAMP)

build:
	MAX_JOBS=$${MAX_JOBS:-2} $(VPY) setup.py build_ext --inplace

# On a machine lent with one NVIDIA GPU (torch, Triton, nvcc, pytest in the system python3; no venv,
# no network): build for that GPU only, CUDA tests, compute-sanitizer, the benchmark at B=128 and the
# compile report, within GPU_CHECK_BUDGET seconds (30 s kept for the summary: 9 minutes in all).
# Results: $$OUT if set, else bench/results/. On a machine without a GPU it stops at once (status 2).
GPU_CHECK_BUDGET ?= 510
gpu-check:
	$(PY) -m bench.gpu_check --budget $(GPU_CHECK_BUDGET)

# The versions `make gpu-check` meets on the GPU machine (torch 2.11, Triton 3.6), checked on this one:
# a second venv (.venv-compat), the extension built against it in a copy of the tree, the compile
# report (0 errors) and the interpreter and compile-report tests. COMPAT_TORCH / COMPAT_TRITON override.
compat:
	PY=$(PY) .ci/compat

clean:
	rm -rf $(VENV) .venv-compat build htsat_kernels/*.so
