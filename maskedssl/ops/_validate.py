"""Argument checks for the public ops: run once, at the op boundary, before any kernel launches.

Wrong type or dtype raises ``TypeError``; wrong shape, device or value raises ``ValueError``. Messages
name the argument and what was expected.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The torch backend also takes float64 (gradchecks); kernel backends fall back to it for float64.
REFERENCE_DTYPES = (*FLOAT_DTYPES, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] | None = None,
                 shape: Sequence[int | None] | None = None, what: str = "") -> torch.Tensor:
    """``t`` is a tensor with ``ndim`` dims, one of ``dtypes``, and ``shape`` (None = any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        hint = f" {what}" if what else ""
        raise ValueError(f"{name} must be {ndim}-D{hint}, got shape {tuple(t.shape)}")
    if shape is not None:
        for got, want in zip(t.shape, shape):
            if want is not None and got != want:
                expected = tuple("*" if s is None else s for s in shape)
                raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (None skipped) live on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}; "
                             "all tensors must be on one device")
    return first


def check_probability(name: str, value: float, *, low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars too, as the ops
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value if low_open else 0.0 <= value) or not (value < 1.0 if high_open else value <= 1.0):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {value}")
    return value


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def checks_requested(requested: bool | None = None) -> bool:
    """Whether the caller wants the data-dependent checks (index ranges, lam range, finite statistics).

    ``requested`` is the op's ``check_indices`` argument: True/False decide; None (the default) means on
    unless ``MASKEDSSL_CHECK_INDICES=0``. Callers whose indices are valid by construction (the models' own
    masks) pass False, so a training step does not stall the GPU queue.
    """
    if requested is not None and not isinstance(requested, bool):
        raise TypeError(f"check_indices must be a bool or None, got {requested!r}")
    if requested is not None:
        return requested
    return os.environ.get("MASKEDSSL_CHECK_INDICES", "1") != "0"


def index_checks_enabled(requested: bool | None = None) -> bool:
    """Whether to run the data-dependent checks in eager mode: each costs one small reduction and one
    device->host sync per call and raises ``ValueError``. False while ``torch.compile`` traces (a sync
    would break the graph): there the checks that cost little become ``assert_on_device`` calls."""
    return checks_requested(requested) and not torch.compiler.is_compiling()


def assert_on_device(condition: torch.Tensor, message: str) -> None:
    """The compiled form of a value check: ``condition`` (a bool tensor) is tested where it lives when the
    graph runs, without a device->host sync, so a bad value never reaches a kernel unnoticed: a
    ``RuntimeError`` with ``message`` on CPU, a device-side assertion on CUDA (which, like any, ends the
    process's CUDA context). Costs one small reduction and, on CUDA, one tiny kernel."""
    torch._assert_async(condition, message)


def check_index_range(name: str, ids: torch.Tensor, high: int, requested: bool | None = None) -> None:
    """Every entry of ``ids`` lies in [0, high): out-of-range indices never reach a kernel. Meta tensors
    hold no values to check. Eager: ``ValueError`` after one sync; under ``torch.compile``: an assertion
    evaluated on the device (``assert_on_device``)."""
    if not checks_requested(requested) or ids.numel() == 0 or ids.device.type == "meta":
        return
    if torch.compiler.is_compiling():
        bound = high if isinstance(high, int) else "its dimension"  # a SymInt under dynamic shapes
        assert_on_device(((ids >= 0) & (ids < high)).all(), f"{name} must hold indices in [0, {bound})")
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one sync for both bounds
    if lo < 0 or hi >= high:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} must hold indices in [0, {high}), found {bad}")


def check_unit_interval(name: str, values: torch.Tensor, requested: bool | None = None) -> None:
    """Every entry of ``values`` (mixing weights) lies in [0, 1]; NaN does not. As ``check_index_range``:
    ``ValueError`` after one sync in eager mode, an assertion on the device under ``torch.compile``."""
    if not checks_requested(requested) or values.numel() == 0 or values.device.type == "meta":
        return
    if torch.compiler.is_compiling():
        assert_on_device(((values >= 0) & (values <= 1)).all(), f"{name} must hold weights in [0, 1]")
        return
    lo, hi = torch.stack(torch.aminmax(values)).tolist()  # NaN propagates, and fails both comparisons
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"{name} must hold weights in [0, 1], found {lo if not 0.0 <= lo else hi}")
