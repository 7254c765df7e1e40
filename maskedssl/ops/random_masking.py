"""``random_masking``: MAE's per-sample random shuffle, as index tensors only (no data moved).

Kept as plain PyTorch (rand + two argsorts): it touches B*L integers, and staying traceable lets
``torch.compile`` fuse it. Same RNG calls as facebookresearch/mae, so a seeded run picks the same mask.
"""

from __future__ import annotations

import numbers

import torch

from ._validate import check_positive_int


def _check_mask_ratio(mask_ratio) -> float:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, numbers.Real):
        raise TypeError(f"mask_ratio must be a float, got {type(mask_ratio).__name__}")
    return float(mask_ratio)


def num_kept(length: int, mask_ratio: float) -> int:
    """K = int(L * (1 - mask_ratio)), MAE's ``len_keep`` (floating-point rounding included, as MAE: L = 10
    at 0.9 keeps 0), for ``length`` >= 0 and ``mask_ratio`` in [0, 1]."""
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    mask_ratio = _check_mask_ratio(mask_ratio)
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    return int(length * (1 - mask_ratio))


def uniform_noise(batch: int, length: int, device=None, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """``torch.rand(batch, length)``, MAE's masking noise. Without a generator the argument is left out:
    torch.rand's generator overload takes concrete sizes only, so ``generator=None`` would not trace once
    ``torch.compile`` makes the batch size symbolic (``dynamic=True``, or the second batch size it sees)."""
    if generator is None:
        return torch.rand(batch, length, device=device)
    return torch.rand(batch, length, device=device, generator=generator)


def noise_device(device, generator: torch.Generator | None) -> torch.device | None:
    """The device random masks are drawn on: ``generator``'s when given (``device``, if also given, must
    name the same one), else ``device`` (None: the default)."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must name a torch device, got {device!r}") from err
    if generator is None:
        return device
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    drawn_on = generator.device
    # "cuda" without an index names the generator's GPU; a CPU generator has no index, so "cpu:0"
    # (the only CPU) is its device too
    if device is not None and (device.type != drawn_on.type or (
            None not in (device.index, drawn_on.index) and device.index != drawn_on.index)):
        raise ValueError(f"generator is on {drawn_on} but device is {device}")
    return drawn_on


def random_masking(batch: int, length: int, mask_ratio: float, device=None,
                   generator: torch.Generator | None = None):
    """Random per-sample masks with MAE semantics.

    Returns ``(ids_keep, ids_restore, mask)``: ``ids_keep`` (B, K) int64, the kept patch indices in
    shuffled order; ``ids_restore`` (B, L) int64, the inverse shuffle (``r < K`` means kept at slot r);
    ``mask`` (B, L) float32, 1 = removed, 0 = kept, in original patch order. ``mask_ratio`` in [0, 1) must
    keep K = ``num_kept(length, mask_ratio)`` >= 1 token. With a ``generator`` the masks are reproducible;
    they are drawn on its device unless ``device`` says otherwise (it must then be the same device).
    """
    check_positive_int("batch", batch)
    check_positive_int("length", length)
    mask_ratio = _check_mask_ratio(mask_ratio)
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = num_kept(length, mask_ratio)
    if keep < 1:
        raise ValueError(f"mask_ratio={mask_ratio} keeps no token of length={length}")
    device = noise_device(device, generator)
    noise = uniform_noise(batch, length, device, generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = (ids_restore >= keep).float()
    return ids_keep, ids_restore, mask
