# pyext: `make test` (CPU tests, CUDA extension built where nvcc is), `make bench`
# (the benchmark suite), `make gpu-check` (on the GPU machine, offline).
# The first two install what they need into a virtual environment, .venv.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.14.1
MAX_JOBS    ?= $(shell nproc)
# pytest workers for `make test` (pytest-xdist): one per core, at most 8
TEST_JOBS   ?= $(shell n=$$(nproc); echo $$(( n < 8 ? n : 8 )))
PY          := $(VENV)/bin/python
HAVE_NVCC   := $(if $(shell command -v nvcc 2>/dev/null),1,0)
OUT         ?= benchmarks/results

export MAX_JOBS
SHELL       := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: test bench gpu-check gpu-test gpu-bench peer-wheels ext clean

$(VENV)/.installed: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" triton numpy pytest pytest-benchmark pytest-xdist \
		ninja pybind11 matplotlib setuptools wheel transformers==5.25.0
	PYEXT_SKIP_CUDA_BUILD=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The CUDA extension, built in place (ninja rebuilds only what changed).
ext: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

# The slowest tests are listed at the end: the suite must stay under 30 minutes on a 2-core machine.
test: ext
	PYEXT_REQUIRE_CUDA_EXT=$(HAVE_NVCC) $(PY) -m pytest -q -n $(TEST_JOBS) --durations=25 tests benchmarks

bench: ext
	$(PY) -m benchmarks --out $(OUT)

# On the GPU machine: its own python3 and packages, no network. `gpu-check`
# is .ci/gpu-check: build, tests, benchmarks in one device call, each stage
# inside what is left of GPU_SECONDS (see that script). For runs split across
# calls by hand: `gpu-test` (build for sm_80 and sm_90a, every test, GPU-marked
# ones too, in parallel where pytest-xdist is installed; TESTS= narrows them)
# and `gpu-bench` (the benchmark suite and the training run, one process at a
# time, so timings see an idle GPU; BENCH_ARGS= e.g. "--ops attention",
# TRAIN=0 skips the training run, BENCH_LIMIT=seconds stops the suite, which
# then reports the cases it finished). Each fails at the end if any of its
# steps failed. The plots are packed into one plots.tgz (the device tool
# brings back at most 8 files).
# Peers the GPU image lacks (Liger-Kernel, pure Python) travel as wheels,
# with einops, which FlashAttention's test file imports (.dev/fa_adapter, NOTES.md):
# `make peer-wheels` here, where there is a network, then carry .whl;
# the GPU targets install them from that folder alone (--no-index).
GPU_ARCHS   ?= 8.0;9.0a
PEER_WHEELS ?= .whl
PEERS       ?= liger-kernel==0.8.5 einops==0.8.1
BENCH_ARGS  ?=
BENCH_LIMIT ?= 0
TRAIN       ?= 1
TESTS       ?= tests
XDIST       := $(shell python3 -c "import xdist" 2>/dev/null && echo "-n 8")
# A kernel that hangs fails its test after 5 minutes instead of eating the call.
TIMEOUT     := $(shell python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 300")

gpu-check:
	OUT=$(OUT) bash .ci/gpu-check

gpu-test:
	mkdir -p $(OUT)
	TORCH_CUDA_ARCH_LIST="$(GPU_ARCHS)" python3 -m pip install -v --no-build-isolation --no-deps -e . \
		> $(OUT)/build.log 2>&1 || { tail -40 $(OUT)/build.log; exit 1; }
	PYEXT_REQUIRE_CUDA_EXT=1 python3 -m pytest -q -rfEs $(XDIST) $(TIMEOUT) $(TESTS) 2>&1 | tee $(OUT)/pytest.log | tail -40

peer-wheels:
	python3 -m pip download -q --no-deps -d $(PEER_WHEELS) $(PEERS)

gpu-bench:
	mkdir -p $(OUT)
	status=0; \
	if ls $(PEER_WHEELS)/*.whl > /dev/null 2>&1; then \
		python3 -m pip install -q --no-deps --no-index $(PEER_WHEELS)/*.whl || status=1; fi; \
	timeout -s TERM $(BENCH_LIMIT) python3 -m benchmarks --out $(OUT) $(BENCH_ARGS) || status=1; \
	if [ "$(TRAIN)" = 1 ]; then python3 -m benchmarks.train_gpt --out $(OUT) || status=1; fi; \
	(cd $(OUT) && tar -czf plots.tgz *.png && rm -f *.png); \
	exit $$status

clean:
	rm -rf build $(VENV) pyext/_C*.so pyext/_C_built_with.json *.egg-info
