"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import os

import torch


def empty_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty``, or NaN-filled (int: -1) when ``MASKEDSSL_POISON_OUTPUTS=1`` (the tests set it),
    so an element a kernel forgets to write fails the comparison with the reference."""
    if os.environ.get("MASKEDSSL_POISON_OUTPUTS", "0") != "1":
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)
