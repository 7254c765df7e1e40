"""Helpers shared by the Triton kernels and their launchers."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def empty_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, or NaN-filled (int: -1) when ``MASKEDSSL_POISON_OUTPUTS=1`` (the tests set it),
    so an element a kernel forgets to write fails the comparison with the reference."""
    if os.environ.get("MASKEDSSL_POISON_OUTPUTS", "0") != "1":
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


@triton.jit
def round_to(val, dtype: tl.constexpr):
    """fp32 -> dtype, round to nearest even, as torch rounds. bf16 is rounded with integer ops (NaN kept
    NaN): the same bits on a GPU and in the Triton interpreter, whose own bf16 cast truncates."""
    if dtype == tl.bfloat16:
        bits = val.to(tl.uint32, bitcast=True)
        bits = tl.where(val != val, 0x7FC00000, bits + 0x7FFF + ((bits >> 16) & 1))  # noqa: PLR0124 (NaN)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return val.to(dtype)


@triton.jit
def to_fp32(val):
    """dtype -> fp32, exactly. bf16 is widened with integer ops (its bits are fp32's top half): the Triton
    interpreter's own bf16 -> fp32 cast loses subnormals, a GPU widens exactly either way."""
    if val.dtype == tl.bfloat16:
        return (val.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return val.to(tl.float32)
