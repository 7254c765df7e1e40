"""Triton kernel of ``mix_patchify``: mixup + patchify + row selection + per-patch normalised targets in
one launch.

What it computes (the torch backend in ``maskedssl/ops/mix_patchify.py`` is the specification): for
sample b with partner q = partner[b] and weight lam[b], pixels read as float32 (uint8 scaled by 1/255,
then (x - mean[c]) / std[c] when given),
  inputs[b, k]  = patch ids_keep[b, k] of lerp(imgs[q], imgs[b], lam[b])        (no mixing: of imgs[b])
  target[b, m]  = normalise(patch ids_masked[b, m] of imgs[b])
  other[b, m]   = normalise(patch ids_masked[b, m] of imgs[q])                  (only when mixing)
normalise = MAE's norm_pix_loss, (t - mean) / sqrt(var + 1e-6) with unbiased var over the row, in fp32,
computed on the row shifted by its first value (exact zeros for a flat patch)
(identity when norm_pix is off). Outputs are written in out_dtype.

Layout: imgs (B, C, H, W) with any strides; a patch row has R = p*p*C entries ordered (py, px, c), i.e.
channel innermost as MAE's patchify. One program handles ROWS output rows of one kind (input rows first,
then target rows), as a (ROWS, next_pow2(R)) block; output stores are contiguous, input loads are
contiguous runs of p pixels per (py, c).

Bytes (per call, elements of size s_in in, s_out out): each output row reads the patch it is made of once
per image it needs (2 when mixing) and writes one row per output:
  read  B * (K + M) * R * s_in * (2 if mixing else 1),  write B * (K + M * (2 if mixing else 1)) * R * s_out.
The floor counts imgs once and each output once: B*C*H*W*s_in + the writes. With ids_keep/ids_masked
complementary (K + M = L) and mixing, each pixel is fetched twice from memory-side (once for its own sample,
once as some sample's partner), so the kernel sits at the floor only when the second fetch hits L2
(uint8 batches of 224 px fit an H100's L2 whole). FLOPs: a few per element, never the limit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import empty_output, round_to, to_fp32

# A program's block holds about this many elements: ~8 per thread at 4 warps.
BLOCK_ELEMENTS = 1024


@triton.jit
def _load_patches(imgs, sample, patch, grid_w, stride_b, stride_h, stride_w, lane_offset, valid, mean_c,
                  std_c, P: tl.constexpr, NORMALIZE: tl.constexpr):
    """Patch ``patch[r]`` of image ``sample[r]`` for each row r of the block, as float32."""
    base = sample * stride_b + (patch // grid_w) * (P * stride_h) + (patch % grid_w) * (P * stride_w)
    x = to_fp32(tl.load(imgs + base[:, None] + lane_offset[None, :], mask=valid, other=0))
    if imgs.dtype.element_ty == tl.uint8:
        x = x / 255.0
    if NORMALIZE:
        x = (x - mean_c[None, :]) / std_c[None, :]
    return x


@triton.jit
def _normalize_rows(x, valid, first, R: tl.constexpr):
    # Shift by the row's first value before the mean (as the torch backend): a flat patch gives exact
    # zeros, not its rounding error amplified by 1 / sqrt(1e-6).
    x = x - tl.sum(tl.where(first, x, 0.0), axis=1)[:, None]
    mean = tl.sum(tl.where(valid, x, 0.0), axis=1) / R
    centered = tl.where(valid, x - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / (R - 1)
    return centered / tl.sqrt_rn(var + 1.0e-6)[:, None]


@triton.jit
def _mix_patchify_kernel(imgs, partner, lam, ids_keep, ids_masked, mean, std, inputs, target, other,
                         input_rows, target_rows, kept, masked, grid_w,
                         stride_b, stride_c, stride_h, stride_w,
                         P: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr, ROWS: tl.constexpr,
                         MIX: tl.constexpr, NORM_PIX: tl.constexpr, NORMALIZE: tl.constexpr):
    R: tl.constexpr = P * P * C
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK_R)
    lane_ok = lane < R
    channel = lane % C
    lane_offset = (channel.to(tl.int64) * stride_c + (lane // (P * C)).to(tl.int64) * stride_h
                   + ((lane // C) % P).to(tl.int64) * stride_w)
    if NORMALIZE:
        mean_c = tl.load(mean + channel, mask=lane_ok, other=0.0)
        std_c = tl.load(std + channel, mask=lane_ok, other=1.0)
    else:
        mean_c = 0.0
        std_c = 1.0
    input_programs = tl.cdiv(input_rows, ROWS)
    if pid < input_programs:
        row = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = row < input_rows
        sample = row // kept
        if ids_keep is None:
            patch = row % kept
        else:
            patch = tl.load(ids_keep + row, mask=row_ok, other=0).to(tl.int64)
        valid = row_ok[:, None] & lane_ok[None, :]
        x = _load_patches(imgs, sample, patch, grid_w, stride_b, stride_h, stride_w, lane_offset, valid,
                          mean_c, std_c, P, NORMALIZE)
        if MIX:
            mate = tl.load(partner + sample, mask=row_ok, other=0).to(tl.int64)
            weight = tl.load(lam + sample, mask=row_ok, other=0.0)[:, None]
            y = _load_patches(imgs, mate, patch, grid_w, stride_b, stride_h, stride_w, lane_offset, valid,
                              mean_c, std_c, P, NORMALIZE)
            # torch.lerp's two-sided form: exact at both ends (lam = 0 gives y, lam = 1 gives x).
            delta = x - y
            x = tl.where(weight < 0.5, y + weight * delta, x - delta * (1.0 - weight))
        out = row[:, None] * R + lane[None, :]
        tl.store(inputs + out, round_to(x, inputs.dtype.element_ty), mask=valid)
    else:
        row = (pid - input_programs).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = row < target_rows
        sample = row // masked
        if ids_masked is None:
            patch = row % masked
        else:
            patch = tl.load(ids_masked + row, mask=row_ok, other=0).to(tl.int64)
        valid = row_ok[:, None] & lane_ok[None, :]
        first = (lane == 0)[None, :]
        out = row[:, None] * R + lane[None, :]
        x = _load_patches(imgs, sample, patch, grid_w, stride_b, stride_h, stride_w, lane_offset, valid,
                          mean_c, std_c, P, NORMALIZE)
        if NORM_PIX:
            x = _normalize_rows(x, valid, first, R)
        tl.store(target + out, round_to(x, target.dtype.element_ty), mask=valid)
        if MIX:
            mate = tl.load(partner + sample, mask=row_ok, other=0).to(tl.int64)
            y = _load_patches(imgs, mate, patch, grid_w, stride_b, stride_h, stride_w, lane_offset, valid,
                              mean_c, std_c, P, NORMALIZE)
            if NORM_PIX:
                y = _normalize_rows(y, valid, first, R)
            tl.store(other + out, round_to(y, other.dtype.element_ty), mask=valid)


def launch_config(patch_size: int, channels: int) -> dict:
    """Block shape and warps the launcher uses for patch rows of p*p*C values (also read by the sm_90
    resource test)."""
    block_r = triton.next_power_of_2(patch_size * patch_size * channels)
    rows = max(1, BLOCK_ELEMENTS // block_r)
    return {"block_r": block_r, "rows": rows, "num_warps": max(1, min(16, rows * block_r // 256))}


def mix_patchify(imgs: torch.Tensor, patch_size: int, partner: torch.Tensor | None, lam: torch.Tensor | None,
                 ids_keep: torch.Tensor | None, ids_masked: torch.Tensor | None, norm_pix: bool,
                 mean: torch.Tensor | None, std: torch.Tensor | None, out_dtype: torch.dtype):
    """Launch on validated arguments (lam, mean, std float32) -> (inputs, target, other); ``other`` is
    empty without mixing."""
    b, c, height, width = imgs.shape
    p = patch_size
    grid_w = width // p
    length = (height // p) * grid_w
    row = p * p * c
    kept = length if ids_keep is None else ids_keep.shape[1]
    masked = length if ids_masked is None else ids_masked.shape[1]
    mix = partner is not None
    device = imgs.device
    inputs = empty_output((b, kept, row), out_dtype, device)
    target = empty_output((b, masked, row), out_dtype, device)
    other = empty_output((b, masked, row) if mix else (0,), out_dtype, device)
    cfg = launch_config(p, c)
    rows = cfg["rows"]
    programs = triton.cdiv(b * kept, rows) + triton.cdiv(b * masked, rows)
    if programs == 0:
        return inputs, target, other
    contiguous = (lambda t: None if t is None else t.contiguous())
    _mix_patchify_kernel[(programs,)](
        imgs, contiguous(partner), contiguous(lam), contiguous(ids_keep), contiguous(ids_masked),
        contiguous(mean), contiguous(std), inputs, target, other,
        b * kept, b * masked, kept, masked, grid_w, *imgs.stride(),
        P=p, C=c, BLOCK_R=cfg["block_r"], ROWS=rows, MIX=mix, NORM_PIX=bool(norm_pix),
        NORMALIZE=mean is not None, num_warps=cfg["num_warps"])
    return inputs, target, other
