"""Masks: MAE semantics from scores, random masks equal to ``ops.random_masking``, informed masks with
hints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskedssl.masking import InformedMasking, masks_from_scores, random_masks
from maskedssl.ops import NCut, ncut_bipartition, patchify, random_masking


def _check_masks(masks, length, keep):
    b = masks.mask.shape[0]
    assert masks.ids_keep.shape == (b, keep) and masks.ids_masked.shape == (b, length - keep)
    everything = torch.cat([masks.ids_keep, masks.ids_masked], dim=1)
    assert torch.equal(everything.sort(1).values, torch.arange(length).expand(b, -1))
    # ids_restore inverts the shuffle, and mask marks exactly the masked positions
    assert torch.equal(everything.gather(1, masks.ids_restore), torch.arange(length).expand(b, -1))
    assert torch.equal(masks.mask.gather(1, masks.ids_masked), torch.ones(b, length - keep))
    assert torch.equal(masks.mask.gather(1, masks.ids_keep), torch.zeros(b, keep))


# a numpy ratio (np.float32 is not a float subclass) used to be a TypeError here but not in random_masking
@pytest.mark.parametrize("batch,length,ratio", [(3, 64, 0.75), (1, 49, 0.5), (2, 196, 0.9),
                                                (2, 16, np.float32(0.75))])
def test_random_masks_equal_ops_random_masking(batch, length, ratio):
    g = torch.Generator().manual_seed(11)
    masks = random_masks(batch, length, ratio, generator=g)
    g.manual_seed(11)
    ids_keep, ids_restore, mask = random_masking(batch, length, ratio, generator=g)
    assert torch.equal(masks.ids_keep, ids_keep) and torch.equal(masks.ids_restore, ids_restore)
    assert torch.equal(masks.mask, mask)
    _check_masks(masks, length, ids_keep.shape[1])


def test_masks_from_scores_keeps_the_lowest():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.0, 1.0, 2.0, -1.0]])
    masks = masks_from_scores(scores, 2)
    assert masks.ids_keep.tolist() == [[1, 3], [3, 0]]
    assert masks.ids_masked.tolist() == [[2, 0], [1, 2]]
    assert masks.mask.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]]
    _check_masks(masks, 4, 2)
    with pytest.raises(ValueError, match="num_keep"):
        masks_from_scores(scores, 5)
    with pytest.raises(ValueError, match="scores"):
        masks_from_scores(scores[0], 2)
    with pytest.raises(TypeError, match="scores"):
        masks_from_scores(scores.to(torch.complex64), 2)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masks(2, 4, 1.0)


def _planted(batch=3, grid=8, side=4, seed=0):
    """Pixel-row features of dark noisy images with a bright side x side-patch square each (zero-centred,
    as normalised pixels are: the two regions point in opposite directions)."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch, 3, grid * 4, grid * 4, generator=g) * 0.2 - 0.5
    objects = torch.zeros(batch, grid, grid, dtype=torch.bool)
    for b in range(batch):
        r, c = torch.randint(0, grid - side + 1, (2,), generator=g).tolist()
        imgs[b, :, r * 4:(r + side) * 4, c * 4:(c + side) * 4] += 1.0
        objects[b, r:r + side, c:c + side] = True
    return patchify(imgs, 4), objects.flatten(1)


def test_informed_masks_cover_the_object_first():
    feats, objects = _planted()
    informed = InformedMasking(mask_ratio=0.75, hint_ratio=0.0)(feats)
    _check_masks(informed.masks, 64, 16)
    assert torch.equal(informed.ncut.foreground, objects)
    assert informed.masks.mask.bool()[objects].all()  # 16 object patches, 48 masked: all of the object
    assert not informed.hints.any()
    # fewer masked patches than object patches: every masked patch lies on the object
    small = InformedMasking(mask_ratio=0.2, hint_ratio=0.0)(feats)
    assert (small.masks.mask.bool() <= objects).all()


def test_hints_stay_visible_and_the_ratio_is_unchanged():
    feats, objects = _planted(side=5)  # 25 object patches (the smaller side: the foreground), 48 masked
    g = torch.Generator().manual_seed(0)
    informed = InformedMasking(mask_ratio=0.75, hint_ratio=0.25)(feats, generator=g)
    masked = informed.masks.mask.bool()
    assert (masked.sum(1) == 48).all()
    assert (informed.hints.sum(1) == 6).all()  # floor(0.25 * 25)
    assert (informed.hints <= objects).all() and not (informed.hints & masked).any()
    assert ((objects & ~masked).sum(1) == 6).all()  # the hints are the only visible object patches
    _check_masks(informed.masks, 64, 16)


def test_hint_count_rounds_as_python_does(monkeypatch):
    """floor(hint_ratio * candidates) was taken in float32: 100 candidates at 0.29 gave 29 hints, where
    int(0.29 * 100) (the float64 product, as num_kept rounds) is 28."""
    length, n = 256, 100
    score = torch.linspace(1, -1, length)[None]  # patch i ranks i-th: the first 100 are the object
    foreground = torch.arange(length)[None] < n
    monkeypatch.setattr("maskedssl.masking.ncut_bipartition",
                        lambda feats, tau, eps: NCut(score, foreground, score))
    for ratio in (0.29, 0.57, 0.58):  # (hints are at most K = 64)
        informed = InformedMasking(mask_ratio=0.75, hint_ratio=ratio)(torch.randn(1, length, 4))
        assert informed.hints.sum().item() == int(ratio * n)
        assert informed.masks.mask.sum().item() == length - 64


def test_informed_masking_validates():
    with pytest.raises(ValueError, match="hint_ratio"):
        InformedMasking(hint_ratio=1.5)
    with pytest.raises(TypeError, match="center_features"):  # "no" was taken as True
        InformedMasking(center_features="no")
    with pytest.raises(TypeError, match="generator"):  # was torch.rand's overload message
        InformedMasking()(torch.randn(2, 16, 4), generator=0)
    with pytest.raises(TypeError, match="generator"):
        random_masks(2, 16, 0.5, generator=0)
    with pytest.raises(ValueError, match="generator is on"):
        random_masks(2, 16, 0.5, device="meta", generator=torch.Generator())
    with pytest.raises(ValueError, match="at least one sample"):
        InformedMasking()(torch.randn(0, 16, 4))
    with pytest.raises(ValueError, match="feats"):
        InformedMasking()(torch.randn(64, 8))
    # the graph arguments fail at construction, not at the first informed step
    with pytest.raises(ValueError, match="tau"):
        InformedMasking(tau=2.0)
    with pytest.raises(TypeError, match="tau"):
        InformedMasking(tau="0.2")
    with pytest.raises(ValueError, match="eps"):
        InformedMasking(eps=0.0)
    with pytest.raises(TypeError, match="feats"):
        InformedMasking()(torch.randint(0, 3, (2, 16, 4)))


def test_centring_fp16_features_cannot_overflow():
    # 60000 - (-60000) is inf in fp16: centring the raw features would turn finite input into inf
    feats = torch.full((2, 8, 4), 6e4, dtype=torch.float16)
    feats[:, 0] = -6e4
    feats[:, 1, 0] = 0
    informed = InformedMasking(mask_ratio=0.5, hint_ratio=0.0)(feats)
    _check_masks(informed.masks, 8, 4)
    assert torch.isfinite(informed.ncut.score).all()


def test_centring_makes_masks_ignore_a_shared_feature_component(monkeypatch):
    """With ``center_features`` the cut sees each sample's features minus their mean, so a component
    shared by every patch (large early in training) changes nothing; without it the raw features go in."""
    rows, objects = _planted()
    shared = 20 * torch.randn(rows.shape[-1], generator=torch.Generator().manual_seed(1))
    centred = InformedMasking(mask_ratio=0.75, hint_ratio=0.0)
    with_shared, without = centred(rows + shared), centred(rows)
    assert torch.equal(with_shared.masks.mask, without.masks.mask)
    assert with_shared.masks.mask.bool()[objects].all()
    seen = []
    monkeypatch.setattr("maskedssl.masking.ncut_bipartition",
                        lambda feats, tau, eps: seen.append(feats) or ncut_bipartition(feats, tau, eps))
    InformedMasking(mask_ratio=0.75, hint_ratio=0.0, center_features=False)(rows + shared)
    torch.testing.assert_close(seen[0], rows + shared)
