"""Backend selection shared by every op: ``torch`` (reference), ``triton`` (kernels/), ``cuda`` (csrc/).

The choice comes from the op's ``backend=`` argument, else ``MASKEDSSL_BACKEND``, else ``auto``.
``auto`` picks the first available backend of the op's preference order for CUDA tensors (an order
to be set from GPU benchmarks; none has run yet) and ``torch`` for CPU tensors.
A backend that was asked for but cannot run here (extension not built, CPU tensors without the Triton
interpreter) falls back to the next one in the op's preference order, saying so once in a log line.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

log = logging.getLogger("maskedssl")

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_VAR = "MASKEDSSL_BACKEND"
_warned: set[str] = set()


def warn_once(message: str) -> None:
    # dynamo cannot trace a logger call (fullgraph=True would fail): while tracing say nothing and leave
    # the message unmarked, so the next eager call still logs it
    if torch.compiler.is_compiling():
        return
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


# Plain module state rather than functools.cache: torch.compile traces these calls without warnings.
_extension: list[bool] = []
_TRITON_FOUND = importlib.util.find_spec("triton") is not None

# Set by the test suite once it has loaded tests/cuda_emu: the kernels of csrc/ compiled for the CPU under an
# emulator and registered for CPU tensors. The cuda backend then runs (slowly) on CPU tensors too, which is
# how the tests execute the CUDA kernels on machines without a GPU, as TRITON_INTERPRET=1 does for kernels/.
cuda_emulated_on_cpu = False


def cuda_extension_loaded() -> bool:
    """Load ``maskedssl._C`` (the CUDA kernels) into ``torch.ops.maskedssl`` once, if it was built."""
    if not _extension:
        _extension.append(_load_extension())
    return _extension[0]


def _load_extension() -> bool:
    spec = importlib.util.find_spec("maskedssl._C")
    if spec is None or spec.origin is None:
        return False
    try:
        torch.ops.load_library(spec.origin)
    except OSError as err:  # built against another torch, missing CUDA runtime, ...
        warn_once(f"maskedssl: the CUDA extension at {spec.origin} failed to load ({err})")
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_importable() -> bool:
    return _TRITON_FOUND


def _runs_here(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device.type}"
    if backend == "cuda":
        if device.type != "cuda" and not (device.type == "cpu" and cuda_emulated_on_cpu):
            return f"CUDA kernels need CUDA tensors, got {device.type}"
        if not cuda_extension_loaded():
            return "the CUDA extension maskedssl._C was not built"
        return None
    raise AssertionError(backend)


def requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else the environment variable, else ``auto``."""
    name = backend if backend is not None else os.environ.get(ENV_VAR) or "auto"  # empty = unset
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string (one of {BACKENDS}) or None, got {type(name).__name__}")
    if name.lower() not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def resolve_backend(op: str, backend: str | None, device: torch.device,
                    auto_order: tuple[str, ...] = ("cuda", "triton", "torch"),
                    dtype: torch.dtype | None = None) -> str:
    """The concrete backend ``op`` runs with on ``device``.

    ``auto_order`` is the op's preference on CUDA tensors, the expected fastest first (to be confirmed by
    its GPU benchmarks, which have not run yet).
    float64 data (gradchecks, float64 references) always runs the torch backend: the kernels serve the
    training dtypes.
    """
    name = requested_backend(backend)
    if dtype == torch.float64:
        if name not in ("auto", "torch"):
            warn_once(f"maskedssl.{op}: backend {name!r} has no float64 kernels; using 'torch'")
        return "torch"
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        return next(b for b in auto_order if _runs_here(b, device) is None)
    reason = _runs_here(name, device)
    if reason is None:
        return name
    order = [b for b in auto_order if b != name] if device.type == "cuda" else ["torch"]
    fallback = next(b for b in (*order, "torch") if _runs_here(b, device) is None)
    warn_once(f"maskedssl.{op}: backend {name!r} unavailable ({reason}); using {fallback!r}")
    return fallback


def refuse_cuda(op: str, name: str, device: torch.device, reason: str | None,
                auto_order: tuple[str, ...] = ("cuda", "triton", "torch")) -> str:
    """``name``, unless it is ``cuda`` and the CUDA kernel cannot take these inputs (``reason`` says why):
    then the next backend of ``auto_order`` that runs on ``device``, with one log line."""
    if name != "cuda" or reason is None:
        return name
    fallback = next(b for b in (*auto_order, "torch") if b != "cuda" and _runs_here(b, device) is None)
    warn_once(f"maskedssl.{op}: {reason}; using {fallback!r}")
    return fallback


def available_backends(device: torch.device | str = "cuda") -> list[str]:
    """Backends that can run on ``device`` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if _runs_here(b, device) is None]
