# The README's commands. Each creates .venv when missing and installs what it needs.
#   make demo      the main job on the embedded synthetic data (CPU is fine)
#   make test      build the CUDA extension when nvcc exists, then the test suite (Triton via its interpreter)
#   make test-asan the CUDA kernels' tests on the CPU emulator under AddressSanitizer (CI runs it too)
#   make bench     throughput regression tests (pytest-benchmark) against benchmarks/baselines/
#   make gpu-test  the GPU-marked tests, on a machine with CUDA

PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.maskedssl-installed
# torch and torchvision are a matched pair; an unpinned torch pulls several GB more.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

NVCC := $(shell command -v nvcc 2>/dev/null)
# nvcc may be a wrapper script: ask the driver where its toolkit is rather than trusting its path.
CUDA_HOME ?= $(if $(NVCC),$(shell cd "$$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$$ TOP=//p')" && pwd),)
export CUDA_HOME
export LIBRARY_PATH := $(if $(CUDA_HOME),$(CUDA_HOME)/lib:$(CUDA_HOME)/lib64:,)$(LIBRARY_PATH)
export MAX_JOBS ?= 2

.PHONY: install build demo test test-asan bench gpu-test clean

$(PY):
	$(PYTHON_SYS) -m venv $(VENV)

$(STAMP): pyproject.toml setup.py | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q 'setuptools>=69' wheel
	MASKEDSSL_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# One build_ext call; ninja keeps the objects in build/ so an unchanged csrc/ rebuilds nothing.
build: $(STAMP)
ifneq ($(NVCC),)
	MASKEDSSL_BUILD_CUDA=1 $(PY) setup.py -q build_ext --inplace
else
	@echo "nvcc not found: skipping the CUDA extension (pure-Python install)"
endif

demo: $(STAMP)
	$(PY) -m maskedssl demo --out runs/demo

test: build
	TRITON_INTERPRET=1 $(PY) -m pytest -m "not benchmark and not gpu" -q

bench: build
	$(PY) -m pytest -m benchmark -q --benchmark-enable

# The CUDA kernels' tests once more, emulated on the CPU (tests/cuda_emu) with AddressSanitizer and UBSan's
# alignment check on every memory access: a kernel touching memory outside its tensors, or loading through
# a misaligned pointer, stops with a report. No GPU needed.
ASAN_PRELOAD = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libstdc++.so)
test-asan: build
	LD_PRELOAD="$(ASAN_PRELOAD)" ASAN_OPTIONS=detect_leaks=0 MASKEDSSL_CUDA_EMULATION=asan TRITON_INTERPRET=0 \
	  $(PY) -m pytest -q -rfE -p no:cacheprovider -k cuda tests/test_cuda_emulator.py tests/test_ops_token_gather.py \
	  tests/test_ops_ncut.py tests/test_ops_mix_patchify.py

gpu-test: build
	$(PY) -m pytest -m gpu -q

clean:
	rm -rf build maskedssl/_C*.so
