"""``patchify`` / ``unpatchify``: MAE's (B, C, H, W) <-> (B, L, p*p*C) layout, channel innermost.

Plain reshapes and one permute: differentiable, traceable, and ``torch.compile`` fuses them into their
neighbours, so they are not custom ops. The fused kernel that also mixes, normalises and gathers rows is
``mix_patchify``.
"""

from __future__ import annotations

import math

import torch

from ._validate import check_positive_int, check_tensor


def grid_size(height: int, width: int, patch_size: int, name: str = "imgs") -> tuple[int, int]:
    """(h, w) patches per column and row; an image size not divisible by the patch is an error."""
    check_positive_int("patch_size", patch_size)
    if height % patch_size or width % patch_size:
        raise ValueError(f"{name} size {height}x{width} is not divisible by patch_size={patch_size}")
    return height // patch_size, width // patch_size


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C), rows in raster order, each row ordered (py, px, c)."""
    check_tensor("imgs", imgs, ndim=4, what="(B, C, H, W)")
    b, c, height, width = imgs.shape
    if c == 0:
        raise ValueError(f"imgs must have at least one channel, got shape {tuple(imgs.shape)}")
    h, w = grid_size(height, width, patch_size)
    p = patch_size
    x = imgs.reshape(b, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, h * w, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, height: int | None = None, width: int | None = None,
               channels: int | None = None) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); a square image unless ``height``/``width`` say otherwise. ``channels``
    defaults to the rows' p*p*C / (p*p); when given, the rows must hold exactly p*p*channels values."""
    check_tensor("x", x, ndim=3, what="(B, L, p*p*C)")
    check_positive_int("patch_size", patch_size)
    b, length, row = x.shape
    p = patch_size
    if channels is None:
        if row == 0 or row % (p * p):
            raise ValueError(f"x rows must have p*p*C entries, a positive multiple of "
                             f"patch_size**2 = {p * p}, got {row}")
        channels = row // (p * p)
    check_positive_int("channels", channels)
    if row != p * p * channels:
        raise ValueError(f"x rows must have p*p*C = {p * p * channels} entries for patch_size={p}, "
                         f"channels={channels}, got {row}")
    if height is None and width is None:
        # not math.isqrt: torch.compile cannot trace it on a symbolic L (dynamic shapes); a float square
        # root is exact on perfect squares far beyond any token count, and the check below catches the rest
        side = round(math.sqrt(length))
        if side * side != length:
            raise ValueError(f"x has L={length} patches, not a square grid: pass height and width")
        h = w = side
    else:
        if height is None or width is None:
            raise ValueError("pass both height and width, or neither")
        for name, value in (("height", height), ("width", width)):  # 0 is patchify's empty image
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        h, w = grid_size(height, width, p, name="height/width")
        if h * w != length:
            raise ValueError(f"height x width = {height}x{width} gives {h * w} patches, x has {length}")
    x = x.reshape(b, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, h * p, w * p)
