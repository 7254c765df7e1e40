"""``mix_patchify``: mix two images of a batch, patchify, keep the encoder's rows, and build the
per-patch normalised reconstruction targets of the unmixed images, in one op.

Semantics (the torch backend spells them out): pixels are read as float32 (uint8 scaled to [0, 1]),
normalised per channel with ``mean``/``std`` when given, then
``mixed[b] = lam[b] * imgs[b] + (1 - lam[b]) * imgs[partner[b]]``. ``inputs`` = patchify(mixed) at rows
``ids_keep``; ``targets`` = patchify(imgs) (and patchify(imgs[partner]) when mixing) at rows
``ids_masked``, each row normalised as MAE's norm_pix_loss (unbiased variance, + 1e-6) when ``norm_pix``.
No gradient flows through it.
"""

from __future__ import annotations

import numbers

import torch

from ._backend import cuda_extension_loaded, refuse_cuda, resolve_backend
from ._validate import (INDEX_DTYPES, REFERENCE_DTYPES, assert_on_device, check_index_range,
                        check_same_device, check_tensor, check_unit_interval, checks_requested)
from .patchify import grid_size, patchify

AUTO_ORDER = ("cuda", "triton", "torch")
IMAGE_DTYPES = (*REFERENCE_DTYPES, torch.uint8)  # float64: torch backend only


def cuda_takes(row: int, channels: int) -> bool:
    """Whether the CUDA kernel fits a patch row of ``row`` = p*p*C values: it holds a row in one 256-thread
    block's registers, 8 values per thread on a multiple-of-C subset of the threads (p <= 26 at C = 3,
    p <= 45 at C = 1). Larger patches run on the next backend."""
    return channels <= 256 and row <= 8 * (256 - 256 % channels)


def normalize_rows(t: torch.Tensor) -> torch.Tensor:
    """MAE's norm_pix_loss target: (t - mean) / sqrt(var + 1e-6) over the last dim, unbiased var, in
    float32 (float64 stays float64). Rows need at least 2 values.

    The row is shifted by its first value before the mean is taken: the same function, but a constant
    row gives exactly 0 instead of its rounding error times 1 / sqrt(1e-6) (up to ~1e-4 on a flat
    patch), and a near-constant row loses no digits to a large common offset. The kernels do the same.
    """
    check_tensor("t", t, dtypes=(*REFERENCE_DTYPES, torch.uint8))
    if t.dim() == 0 or t.shape[-1] < 2:
        raise ValueError(f"t must have rows of at least 2 values (unbiased variance), "
                         f"got shape {tuple(t.shape)}")
    t = t.double() if t.dtype == torch.float64 else t.float()
    if t.numel() == 0:
        return t.clone()
    shifted = t - t[..., :1]
    centered = shifted - shifted.mean(dim=-1, keepdim=True)
    var = centered.square().sum(dim=-1, keepdim=True) / (t.shape[-1] - 1)
    return centered / (var + 1.0e-6).sqrt()


def _rows(x: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    if ids is None:
        return x.clone()  # patchify may return a view; op outputs must not alias imgs or each other
    return torch.gather(x, 1, ids.long().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _mix_patchify_torch(imgs, patch_size, partner, lam, ids_keep, ids_masked, norm_pix, mean, std,
                        out_dtype):
    # float32 arithmetic, as the kernels; float64 throughout when imgs or the outputs are float64
    compute = torch.float64 if torch.float64 in (imgs.dtype, out_dtype) else torch.float32
    x = imgs.to(compute)
    if imgs.dtype == torch.uint8:
        x = x / 255.0
    if mean is not None:
        x = (x - mean.to(compute).view(1, -1, 1, 1)) / std.to(compute).view(1, -1, 1, 1)
    unmixed = [x] if partner is None else [x, x[partner.long()]]
    mixed = x if partner is None else torch.lerp(unmixed[1], x, lam.to(compute).view(-1, 1, 1, 1))
    inputs = _rows(patchify(mixed, patch_size), ids_keep).to(out_dtype)
    targets = []
    for img in unmixed:
        t = _rows(patchify(img, patch_size), ids_masked)
        targets.append((normalize_rows(t) if norm_pix else t).to(out_dtype))
    if partner is None:
        targets.append(inputs.new_empty(0))
    return inputs, targets[0], targets[1]


@torch.library.custom_op("maskedssl::mix_patchify", mutates_args=())
def _mix_patchify_op(imgs: torch.Tensor, patch_size: int, partner: torch.Tensor | None,
                     lam: torch.Tensor | None, ids_keep: torch.Tensor | None, ids_masked: torch.Tensor | None,
                     norm_pix: bool, mean: torch.Tensor | None, std: torch.Tensor | None,
                     out_dtype: torch.dtype, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (imgs, patch_size, partner, lam, ids_keep, ids_masked, norm_pix, mean, std, out_dtype)
    if backend == "triton":
        from maskedssl.kernels.mix_patchify import mix_patchify as launch

        return launch(*args)
    if backend == "cuda":
        return torch.ops.maskedssl.mix_patchify_cuda(*args)
    return _mix_patchify_torch(*args)


def _fake_outputs(imgs, patch_size, partner, lam, ids_keep, ids_masked, norm_pix, mean, std, out_dtype):
    b, c, height, width = imgs.shape
    length = (height // patch_size) * (width // patch_size)
    row = patch_size * patch_size * c
    kept = length if ids_keep is None else ids_keep.shape[1]
    masked = length if ids_masked is None else ids_masked.shape[1]
    inputs = imgs.new_empty(b, kept, row, dtype=out_dtype)
    target = imgs.new_empty(b, masked, row, dtype=out_dtype)
    other = imgs.new_empty(b, masked, row, dtype=out_dtype) if partner is not None else \
        imgs.new_empty(0, dtype=out_dtype)
    return inputs, target, other


@_mix_patchify_op.register_fake
def _(*args):
    return _fake_outputs(*args[:-1])  # the last argument is the backend

if cuda_extension_loaded():
    torch.library.register_fake("maskedssl::mix_patchify_cuda")(_fake_outputs)


def _check_rows(name, ids, b):
    if ids is None:
        return
    check_tensor(name, ids, ndim=2, dtypes=INDEX_DTYPES, what="(B, rows)")
    if ids.shape[0] != b:
        raise ValueError(f"{name} must have shape ({b}, rows), got {tuple(ids.shape)}")


def _check_values(b, length, partner, lam, ids_keep, ids_masked, mean, std, check_indices):
    """The checks that read values (one device->host sync each); ``check_indices`` decides, as for the
    other ops."""
    if not checks_requested(check_indices):  # also refuses a check_indices that is not a bool or None
        return
    for name, ids, high in (("partner", partner, b), ("ids_keep", ids_keep, length),
                            ("ids_masked", ids_masked, length)):
        if ids is not None:
            check_index_range(name, ids, high, check_indices)
    if lam is not None:
        check_unit_interval("lam", lam, check_indices)
    if mean is None:
        return
    if torch.compiler.is_compiling():
        assert_on_device(torch.isfinite(mean).all() & (torch.isfinite(std) & (std > 0)).all(),
                         "mean must be finite, and std finite and positive")
        return
    ok = torch.stack([torch.isfinite(mean).all(), (torch.isfinite(std) & (std > 0)).all()]).tolist()
    if not ok[0]:
        raise ValueError(f"mean must be finite, got {mean.tolist()}")
    if not ok[1]:
        raise ValueError(f"std must be finite and positive, got {std.tolist()}")


def mix_patchify(imgs: torch.Tensor, patch_size: int, *, partner: torch.Tensor | None = None,
                 lam: torch.Tensor | float | None = None, ids_keep: torch.Tensor | None = None,
                 ids_masked: torch.Tensor | None = None, norm_pix: bool = True,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None, backend: str | None = None,
                 check_indices: bool | None = None):
    """Mix, patchify, select rows and build targets -> ``(inputs, targets)``.

    imgs: (B, C, H, W) float32/bfloat16/float16/uint8 (float64: torch backend), C >= 1, H and W divisible
    by ``patch_size``; partner: (B,) int32/int64 indices into the batch, with ``lam`` (a float, a 0-d or
    (B,) float tensor, in [0, 1]) the weight of ``imgs[b]``; ids_keep: (B, K) rows for ``inputs``;
    ids_masked: (B, M) rows for ``targets`` (rows may repeat); mean/std: (C,) per-channel normalisation,
    std > 0; norm_pix: bool; out_dtype: float32/bfloat16/float16/float64, defaults to imgs' dtype (float32
    for uint8). Pixels are computed in float32, or float64 when imgs or out_dtype is float64.
    Returns ``inputs`` (B, K, p*p*C) and ``targets``, a tuple of one (B, M, p*p*C) tensor per unmixed
    image: ``(imgs,)``, or ``(imgs, imgs[partner])`` when mixing.

    Backends: ``torch`` (the reference, in plain passes: patchify, mix, gather, normalise), ``triton``
    (kernels/mix_patchify.py) and ``cuda`` (csrc/mix_patchify.cu), the kernels in one pass over the pixels,
    reading only the patches the rows need. The value checks (partner, lam and row index ranges, finite
    mean and positive std) cost one device->host sync each (``check_indices=False`` or
    ``MASKEDSSL_CHECK_INDICES=0`` skips them); under ``torch.compile`` they are assertions the device
    evaluates when the graph runs, without a sync (``_validate.assert_on_device``).
    """
    check_tensor("imgs", imgs, ndim=4, dtypes=IMAGE_DTYPES, what="(B, C, H, W)")
    b, c, height, width = imgs.shape
    if c == 0:
        raise ValueError(f"imgs must have at least one channel, got shape {tuple(imgs.shape)}")
    h, w = grid_size(height, width, patch_size)
    length = h * w
    if norm_pix not in (True, False):
        raise TypeError(f"norm_pix must be a bool, got {norm_pix!r}")
    if norm_pix and patch_size * patch_size * c < 2:
        raise ValueError("norm_pix needs at least 2 values per patch (p*p*C >= 2)")
    if out_dtype is None:
        out_dtype = torch.float32 if imgs.dtype == torch.uint8 else imgs.dtype
    if out_dtype not in REFERENCE_DTYPES:
        raise TypeError(f"out_dtype must be one of float32, bfloat16, float16, float64, got {out_dtype}")
    compute = torch.float64 if torch.float64 in (imgs.dtype, out_dtype) else torch.float32
    if (partner is None) != (lam is None):
        raise ValueError("partner and lam go together: pass both to mix, or neither")
    if partner is not None:
        check_tensor("partner", partner, shape=(b,), dtypes=INDEX_DTYPES)
        if isinstance(lam, bool) or (isinstance(lam, torch.Tensor) and lam.dtype == torch.bool):
            raise TypeError("lam must be a float or a (B,) float tensor, got bool")
        if isinstance(lam, numbers.Real):
            if not 0.0 <= lam <= 1.0:
                raise ValueError(f"lam must be in [0, 1], got {lam}")
            # zeros + lam rather than torch.full(..., float(lam)): torch.compile keeps a Python float in
            # arithmetic symbolic, but specialises it as a fill value (a recompile for every new lam)
            lam = torch.zeros(b, dtype=compute, device=imgs.device) + float(lam)
        if isinstance(lam, torch.Tensor) and lam.dim() == 0:  # one weight for the whole batch
            lam = lam.expand(b)
        check_tensor("lam", lam, shape=(b,), dtypes=REFERENCE_DTYPES, what="(B,)")
        lam = lam.detach().to(compute)
    _check_rows("ids_keep", ids_keep, b)
    _check_rows("ids_masked", ids_masked, b)
    if (mean is None) != (std is None):
        raise ValueError("mean and std go together: pass both, or neither")
    if mean is not None:
        check_tensor("mean", mean, shape=(c,), dtypes=REFERENCE_DTYPES)
        check_tensor("std", std, shape=(c,), dtypes=REFERENCE_DTYPES)
        mean, std = mean.detach().to(compute), std.detach().to(compute)
    # every device before any value is read: a value check on another device (or meta) would fail obscurely
    device = check_same_device(imgs=imgs, partner=partner, lam=lam, ids_keep=ids_keep, ids_masked=ids_masked,
                               mean=mean, std=std)
    if device.type != "meta":
        _check_values(b, length, partner, lam, ids_keep, ids_masked, mean, std, check_indices)
    name = resolve_backend("mix_patchify", backend, device, AUTO_ORDER, dtype=compute)
    row = patch_size * patch_size * c
    refusal = (None if cuda_takes(row, c) else
               f"C = {c} channels exceed the CUDA kernel's 256" if c > 256 else
               f"patch rows of p*p*C = {row} values are too long for the CUDA kernel")
    name = refuse_cuda("mix_patchify", name, device, refusal, AUTO_ORDER)
    inputs, target, other = torch.ops.maskedssl.mix_patchify(
        imgs.detach(), patch_size, partner, lam, ids_keep, ids_masked, bool(norm_pix), mean, std, out_dtype,
        name)
    return inputs, (target,) if partner is None else (target, other)
