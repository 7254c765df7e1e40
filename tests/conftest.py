"""Shared test setup: poisoned kernel outputs, GPU skipping, the dtype tolerance table, backends."""

from __future__ import annotations

import os

import pytest
import torch


# (dtype, atol, rtol) from KERNELS.md
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (1e-2, 1e-2),
}
DTYPES = list(TOLERANCES)

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _emulate_cuda() -> bool:
    """Without a GPU, run the kernels of csrc/ on CPU tensors under tests/cuda_emu (built once, cached by
    ninja under build/cuda_emu; about a minute the first time). Needs maskedssl._C for the op schemas, as
    `make build` and CI build it. MASKEDSSL_CUDA_EMULATION: 1 (default) on, 0 off, asan: built with
    AddressSanitizer (`make test-asan`). A build error fails the run."""
    mode = os.environ.get("MASKEDSSL_CUDA_EMULATION", "1")
    if mode not in ("0", "1", "asan"):
        raise ValueError(f"MASKEDSSL_CUDA_EMULATION must be 0, 1 or asan, got {mode!r}")
    if HAS_CUDA or mode == "0":
        return False
    if mode == "asan" and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        raise RuntimeError("MASKEDSSL_CUDA_EMULATION=asan needs the ASan runtime preloaded: "
                           "run `make test-asan`")
    from maskedssl.ops import _backend

    if not _backend.cuda_extension_loaded():
        return False
    from cuda_emu.build import build_and_load

    build_and_load(sanitize=mode == "asan")
    _backend.cuda_emulated_on_cpu = True
    return True


CUDA_EMULATED = _emulate_cuda()


def cpu_kernel_backends() -> list[str]:
    """Kernel backends that can run on CPU tensors in this process: Triton through its interpreter, the
    CUDA kernels under the emulator."""
    return (["triton"] if INTERPRET else []) + (["cuda"] if CUDA_EMULATED else [])


def gpu_kernel_backends() -> list[str]:
    from maskedssl.ops import available_backends

    return [b for b in ("triton", "cuda") if HAS_CUDA and b in available_backends("cuda")]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def pytest_configure(config):
    # Kernels allocate outputs NaN-filled under test, so an element they never write cannot pass; not in a
    # run of the throughput tests (`-m benchmark`), where the fill would be timed as part of every kernel.
    # Set before any kernel runs: the CUDA extension reads it once.
    markexpr = config.getoption("markexpr", "") or ""
    timing = "benchmark" in markexpr and "not benchmark" not in markexpr
    os.environ.setdefault("MASKEDSSL_POISON_OUTPUTS", "0" if timing else "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
