"""The torch (reference) backend of every op against hand-written loops, float64 gradchecks, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskedssl import ops
from maskedssl.ops.mix_patchify import normalize_rows


# ----------------------------------------------------------------------------- random_masking
@pytest.mark.parametrize("batch,length,ratio", [(1, 1, 0.0), (3, 196, 0.75), (2, 49, 0.5), (4, 50, 0.9)])
def test_random_masking_semantics(batch, length, ratio):
    ids_keep, ids_restore, mask = ops.random_masking(batch, length, ratio)
    keep = int(length * (1 - ratio))
    assert ids_keep.shape == (batch, keep) and ids_keep.dtype == torch.int64
    assert ids_restore.shape == (batch, length) and mask.shape == (batch, length)
    for b in range(batch):
        assert sorted(ids_restore[b].tolist()) == list(range(length))  # a permutation
        for slot, idx in enumerate(ids_keep[b].tolist()):
            assert ids_restore[b, idx] == slot
            assert mask[b, idx] == 0
        assert mask[b].sum() == length - keep


def test_random_masking_matches_mae_rng():
    torch.manual_seed(3)
    ids_keep, ids_restore, mask = ops.random_masking(2, 16, 0.75)
    torch.manual_seed(3)
    noise = torch.rand(2, 16)
    shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(ids_keep, shuffle[:, :4])
    assert torch.equal(ids_restore, torch.argsort(shuffle, dim=1))


def test_random_masking_generator_is_reproducible():
    a = ops.random_masking(2, 10, 0.5, generator=torch.Generator().manual_seed(1))
    b = ops.random_masking(2, 10, 0.5, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu", 0), None])
def test_random_masking_generator_on_any_name_of_its_device(device):
    """A CPU generator has no device index: "cpu:0" names its device too (was a ValueError)."""
    a = ops.random_masking(2, 10, 0.5, device=device, generator=torch.Generator().manual_seed(1))
    b = ops.random_masking(2, 10, 0.5, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_random_masks_trace_with_a_symbolic_batch():
    """torch.rand's generator overload needs concrete sizes: passing generator=None failed to trace once
    torch.compile made the batch symbolic (dynamic=True, or the second batch size a compiled MAE saw)."""
    from maskedssl.masking import random_masks

    def draw(x):
        ids_keep, ids_restore, mask = ops.random_masking(x.shape[0], x.shape[1], 0.5, device=x.device)
        return ids_keep, ids_restore, mask, random_masks(x.shape[0], x.shape[1], 0.5, device=x.device).mask

    for dynamic in (True, None):
        compiled = torch.compile(draw, fullgraph=True, dynamic=dynamic, backend="eager")
        for batch in (2, 3, 5):
            ids_keep, ids_restore, mask, other_mask = compiled(torch.empty(batch, 8))
            assert ids_keep.shape == (batch, 4) and other_mask.shape == (batch, 8)
            assert torch.equal(torch.gather(ids_restore, 1, ids_keep), torch.arange(4).expand(batch, 4))
            assert torch.equal(mask, (ids_restore >= 4).float())


@pytest.mark.parametrize("args,err", [((0, 4, 0.5), ValueError), ((2, 4, 1.0), ValueError),
                                      ((2, 4, -0.1), ValueError), ((2, 3, 0.9), ValueError),
                                      ((2.0, 4, 0.5), TypeError), ((2, 4, "0.5"), TypeError)])
def test_random_masking_rejects(args, err):
    with pytest.raises(err):
        ops.random_masking(*args)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(generator=5), TypeError, "generator"),  # used to raise AttributeError
    (dict(device="bogus"), ValueError, "device"),  # used to raise RuntimeError from torch.rand
    (dict(device="meta", generator=torch.Generator()), ValueError, "generator"),
])
def test_random_masking_rejects_device_and_generator(kwargs, err, match):
    with pytest.raises(err, match=match):
        ops.random_masking(2, 10, 0.5, **kwargs)


def test_random_masking_edges_and_numpy_ratio():
    ids_keep, ids_restore, mask = ops.random_masking(2, 7, 0.0)  # K = L
    assert ids_keep.shape == (2, 7) and mask.sum() == 0
    ids_keep, _, mask = ops.random_masking(3, 196, 0.99)  # K = int(196 * 0.01) = 1
    assert ids_keep.shape == (3, 1) and mask.sum() == 3 * 195
    assert ops.random_masking(2, 16, np.float32(0.75))[0].shape == (2, 4)
    with pytest.raises(ValueError, match="keeps no token"):  # K = 0
        ops.random_masking(2, 196, 0.999)


@pytest.mark.parametrize("length,ratio,want", [(196, 0.75, 49), (196, 0.0, 196), (196, 1.0, 0), (0, 0.5, 0),
                                               (50, 0.9, 4), (16, np.float32(0.75), 4)])
def test_num_kept_is_mae_len_keep(length, ratio, want):
    assert ops.num_kept(length, ratio) == want == int(length * (1 - float(ratio)))


@pytest.mark.parametrize("args,err,match", [
    ((10, 1.5), ValueError, "mask_ratio"), ((10, -0.5), ValueError, "mask_ratio"),  # used to give -5, 15
    ((10, float("nan")), ValueError, "mask_ratio"), ((10, "0.5"), TypeError, "mask_ratio"),
    ((10, True), TypeError, "mask_ratio"), ((-10, 0.5), ValueError, "length"),
    ((10.5, 0.5), TypeError, "length"),
])
def test_num_kept_rejects(args, err, match):
    with pytest.raises(err, match=match):
        ops.num_kept(*args)


# ----------------------------------------------------------------------------- gather / scatter
def _gather_loop(x, ids, pos):
    b, k = ids.shape
    out = torch.empty(b, k, x.shape[2], dtype=x.dtype)
    for i in range(b):
        for j in range(k):
            idx = int(ids[i, j])
            out[i, j] = x[i, idx] + (pos[idx] if pos is not None else 0)
    return out


def _scatter_loop(x_vis, ids_restore, mask_token, pos):
    b, length = ids_restore.shape
    k = x_vis.shape[1]
    out = torch.empty(b, length, x_vis.shape[2], dtype=x_vis.dtype)
    for i in range(b):
        for j in range(length):
            r = int(ids_restore[i, j])
            out[i, j] = (x_vis[i, r] if r < k else mask_token) + (pos[j] if pos is not None else 0)
    return out


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("with_pos", [True, False])
def test_gather_tokens_matches_loop(index_dtype, with_pos):
    x = torch.randn(3, 7, 5)
    pos = torch.randn(7, 5) if with_pos else None
    ids = torch.tensor([[0, 6, 3], [2, 2, 1], [5, 4, 0]], dtype=index_dtype)  # repeats are valid
    torch.testing.assert_close(ops.gather_tokens(x, ids, pos, backend="torch"), _gather_loop(x, ids, pos),
                               rtol=0, atol=0)


@pytest.mark.parametrize("with_pos", [True, False])
def test_scatter_tokens_matches_loop(with_pos):
    _, ids_restore, _ = ops.random_masking(3, 9, 0.6)
    x_vis = torch.randn(3, 3, 4)
    mask_token = torch.randn(1, 1, 4)
    pos = torch.randn(9, 4) if with_pos else None
    expected = _scatter_loop(x_vis, ids_restore, mask_token.reshape(4), pos)
    torch.testing.assert_close(ops.scatter_tokens(x_vis, ids_restore, mask_token, pos, backend="torch"),
                               expected, rtol=0, atol=0)


def test_gather_tokens_gradcheck():
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 4, 4], [0, 5, 2]])
    assert torch.autograd.gradcheck(lambda a, p: ops.gather_tokens(a, ids, p, backend="torch"), (x, pos))


def test_scatter_tokens_gradcheck():
    _, ids_restore, _ = ops.random_masking(2, 6, 0.5)
    x_vis = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    token = torch.randn(4, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, t, p: ops.scatter_tokens(a, ids_restore, t, p, backend="torch"), (x_vis, token, pos))


def test_gather_scatter_opcheck():
    x = torch.randn(2, 6, 3, requires_grad=True)
    ids = torch.tensor([[1, 4], [0, 5]])
    torch.library.opcheck(torch.ops.maskedssl.gather_tokens.default, (x, ids, torch.randn(6, 3), "torch"))
    _, ids_restore, _ = ops.random_masking(2, 6, 0.5)
    x_vis = torch.randn(2, 3, 3, requires_grad=True)
    torch.library.opcheck(torch.ops.maskedssl.scatter_tokens.default,
                          (x_vis, ids_restore, torch.randn(3), None, "torch"))


@pytest.mark.parametrize("call,err,words", [
    (lambda: ops.gather_tokens(torch.randn(2, 5), torch.zeros(2, 1, dtype=torch.long)), ValueError,
     "x must be 3-D"),
    (lambda: ops.gather_tokens(torch.randn(2, 5, 3), torch.zeros(2, 1)), TypeError,
     "ids_keep must have dtype"),
    (lambda: ops.gather_tokens(torch.randn(2, 5, 3).int(), torch.zeros(2, 1, dtype=torch.long)), TypeError,
     "x must"),
    (lambda: ops.gather_tokens(torch.randn(2, 5, 3), torch.full((2, 1), 5)), ValueError, r"\[0, 5\)"),
    (lambda: ops.gather_tokens(torch.randn(2, 5, 3), torch.full((2, 1), -1)), ValueError,
     "ids_keep must hold"),
    (lambda: ops.gather_tokens(torch.randn(2, 5, 3), torch.zeros(3, 1, dtype=torch.long)), ValueError,
     "ids_keep"),
    (lambda: ops.gather_tokens(torch.randn(2, 5, 3), torch.zeros(2, 1, dtype=torch.long), torch.randn(4, 3)),
     ValueError, "pos must have shape"),
    (lambda: ops.gather_tokens(torch.randn(2, 5, 3), torch.zeros(2, 1, dtype=torch.long),
                               torch.randn(5, 3, dtype=torch.float64)), TypeError, "pos must"),
    (lambda: ops.gather_tokens("x", torch.zeros(2, 1, dtype=torch.long)), TypeError,
     "x must be a torch.Tensor"),
    (lambda: ops.scatter_tokens(torch.randn(2, 2, 3), torch.zeros(2, 4, dtype=torch.long), torch.randn(4)),
     ValueError, "mask_token must hold"),
    (lambda: ops.scatter_tokens(torch.randn(2, 2, 3), torch.full((2, 4), 4), torch.randn(3)), ValueError,
     "ids_restore"),
    (lambda: ops.gather_tokens(torch.randn(2, 5, 3), torch.zeros(2, 1, dtype=torch.long), backend="fast"),
     ValueError, "backend must be one of"),
])
def test_gather_scatter_reject_bad_input(call, err, words):
    with pytest.raises(err, match=words):
        call()


# ----------------------------------------------------------------------------- patchify
def test_patchify_matches_loop_and_round_trips():
    imgs = torch.randn(2, 3, 8, 12)
    p = 4
    out = ops.patchify(imgs, p)
    assert out.shape == (2, 6, p * p * 3)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                row = out[b, i * 3 + j]
                for py in range(p):
                    for px in range(p):
                        for c in range(3):
                            assert row[(py * p + px) * 3 + c] == imgs[b, c, i * p + py, j * p + px]
    assert torch.equal(ops.unpatchify(out, p, height=8, width=12), imgs)


def test_patchify_rejects():
    with pytest.raises(ValueError, match="not divisible"):
        ops.patchify(torch.randn(1, 3, 10, 8), 4)
    with pytest.raises(ValueError, match="must be 4-D"):
        ops.patchify(torch.randn(3, 8, 8), 4)
    with pytest.raises(ValueError, match="not a square grid"):
        ops.unpatchify(torch.randn(1, 6, 48), 4)


# ----------------------------------------------------------------------------- mix_patchify
def _mix_loop(imgs, p, partner, lam, ids_keep, ids_masked, mean, std):
    x = imgs.double()
    if imgs.dtype == torch.uint8:
        x = x / 255
    if mean is not None:
        x = (x - mean.double()[None, :, None, None]) / std.double()[None, :, None, None]
    rows = ops.patchify(x, p)
    mixed = torch.stack([lam[b] * rows[b] + (1 - lam[b]) * rows[partner[b]] for b in range(len(imgs))])
    inputs = torch.stack([mixed[b, ids_keep[b]] for b in range(len(imgs))])
    targets = []
    for src in (rows, rows[partner]):
        t = torch.stack([src[b, ids_masked[b]] for b in range(len(imgs))])
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).sum(-1, keepdim=True) / (t.shape[-1] - 1)
        targets.append((t - mu) / torch.sqrt(var + 1e-6))
    return inputs, targets


@pytest.mark.parametrize("uint8", [False, True])
def test_mix_patchify_matches_loop(uint8):
    b, c, p = 3, 3, 4
    imgs = torch.randint(0, 256, (b, c, 8, 12), dtype=torch.uint8) if uint8 else torch.rand(b, c, 8, 12)
    partner = torch.tensor([2, 0, 2])
    lam = torch.tensor([0.3, 0.8, 1.0])
    ids_keep, ids_restore, _ = ops.random_masking(b, 6, 0.5)
    ids_masked = torch.argsort(ids_restore, dim=1)[:, 3:]
    mean, std = (torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])) if uint8 else (None, None)
    inputs, targets = ops.mix_patchify(imgs, p, partner=partner, lam=lam, ids_keep=ids_keep,
                                       ids_masked=ids_masked, mean=mean, std=std, backend="torch")
    exp_inputs, exp_targets = _mix_loop(imgs, p, partner, lam, ids_keep, ids_masked, mean, std)
    assert inputs.dtype == torch.float32 and len(targets) == 2
    torch.testing.assert_close(inputs.double(), exp_inputs, rtol=1e-5, atol=1e-5)
    for got, want in zip(targets, exp_targets):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_mix_patchify_without_mixing_is_patchify():
    imgs = torch.randn(2, 1, 8, 8)
    inputs, (target,) = ops.mix_patchify(imgs, 2, norm_pix=False, backend="torch")
    assert torch.equal(inputs, ops.patchify(imgs, 2)) and torch.equal(target, inputs)
    _, (normed,) = ops.mix_patchify(imgs, 2, backend="torch")
    torch.testing.assert_close(normed, normalize_rows(ops.patchify(imgs, 2)))


@pytest.mark.parametrize("kwargs,err", [
    (dict(partner=torch.tensor([0, 2])), ValueError),  # partner without lam
    (dict(partner=torch.tensor([0, 2]), lam=0.5), ValueError),  # out of range
    (dict(partner=torch.tensor([0, 1]), lam=1.5), ValueError),
    (dict(partner=torch.tensor([0.0, 1.0]), lam=0.5), TypeError),
    (dict(ids_keep=torch.tensor([[0, 4]] * 2)), ValueError),
    (dict(mean=torch.zeros(3)), ValueError),
    (dict(mean=torch.zeros(2), std=torch.ones(2)), ValueError),
    (dict(out_dtype=torch.int32), TypeError),
])
def test_mix_patchify_rejects(kwargs, err):
    with pytest.raises(err):
        ops.mix_patchify(torch.rand(2, 3, 4, 4), 2, **kwargs)


def test_normalize_rows_matches_formula_and_rejects():
    t = torch.randn(3, 5, 12, dtype=torch.float64) * 3 + 100  # a large common offset
    mu = t.mean(-1, keepdim=True)
    want = (t - mu) / torch.sqrt(((t - mu) ** 2).sum(-1, keepdim=True) / 11 + 1e-6)
    got = normalize_rows(t)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(normalize_rows(t.float()), want.float(), rtol=1e-5, atol=1e-5)
    assert normalize_rows(torch.randn(2, 0, 4)).shape == (2, 0, 4)
    for bad, err in ((torch.randn(3, 1), ValueError), (torch.tensor(1.0), ValueError),
                     (torch.ones(3, 4, dtype=torch.long), TypeError), ([1.0, 2.0], TypeError)):
        with pytest.raises(err, match="t "):
            normalize_rows(bad)


def test_mix_patchify_rejects_indivisible_image():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        ops.mix_patchify(torch.rand(2, 3, 6, 4), 4)


# ----------------------------------------------------------------------------- ncut_bipartition
def _planted(b, n, d, frac, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, 2, d, generator=g)
    fg = torch.zeros(b, n, dtype=torch.bool)
    fg[:, : max(1, int(n * frac))] = True
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    fg = torch.gather(fg, 1, perm)
    feats = torch.where(fg.unsqueeze(-1), centers[:, :1], centers[:, 1:])
    feats = feats + noise * torch.randn(b, n, d, generator=g)
    return feats, fg


def _ncut_loop(feats, tau, eps):
    """The generalized eigenproblem (D - A) v = lambda D v of one sample, solved with scipy-free float64."""
    f = feats.double()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = f @ f.T
    a = cos.clamp_min(eps) if tau is None else torch.where(cos > tau, 1.0, eps).double()
    deg = torch.diag(a.sum(1))
    # D^-1 (D - A) is similar to the symmetric normalised Laplacian; solve through a Cholesky factor of D
    chol_inv = torch.diag(1 / torch.sqrt(torch.diag(deg)))
    vals, vecs = torch.linalg.eigh(chol_inv @ (deg - a) @ chol_inv)
    return chol_inv @ vecs[:, 1], vals


@pytest.mark.parametrize("tau", [None, 0.2])
def test_ncut_reference_matches_generalized_eigenproblem(tau):
    feats, _ = _planted(3, 20, 8, 0.3, 0.4)
    res = ops.ncut_bipartition(feats, tau=tau, backend="torch")
    for b in range(3):
        v, _ = _ncut_loop(feats[b], tau, 1e-5)
        v = (v / v.norm()).float()
        cos = torch.dot(v, res.fiedler[b]).abs()
        assert cos > 0.9999
        seed = int(v.abs().argmax())
        side = v > v.mean() if v[seed] > v.mean() else v <= v.mean()
        assert torch.equal(side, res.foreground[b])
    assert torch.allclose(res.fiedler.norm(dim=1), torch.ones(3))


def test_ncut_finds_planted_cluster_and_scores():
    feats, fg = _planted(4, 30, 16, 0.3, 0.2, seed=1)
    res = ops.ncut_bipartition(feats, backend="torch")
    agree = (res.foreground == fg) | (res.foreground == ~fg)
    assert agree.all()
    # scores: cosine to the foreground mean, highest on the foreground side
    for b in range(4):
        assert res.score[b][res.foreground[b]].min() > res.score[b][~res.foreground[b]].max()
    fgn = torch.nn.functional.normalize(feats, dim=-1)
    for b in range(4):
        m = fgn[b][res.foreground[b]].mean(0)
        torch.testing.assert_close(res.score[b], fgn[b] @ m / m.norm(), rtol=1e-5, atol=1e-5)
    # sign convention: the foreground is the side above the mean
    assert torch.equal(res.foreground, res.fiedler > res.fiedler.mean(1, keepdim=True))


@pytest.mark.parametrize("feats", [torch.ones(2, 5, 4), torch.zeros(2, 5, 4), torch.randn(2, 2, 3)])
def test_ncut_degenerate_inputs_are_valid(feats):
    res = ops.ncut_bipartition(feats, backend="torch")
    for t in (res.fiedler, res.score):
        assert torch.isfinite(t).all()
    assert res.foreground.any(1).all()
    again = ops.ncut_bipartition(feats, backend="torch")
    assert torch.equal(res.foreground, again.foreground)


def test_ncut_opcheck():
    feats, _ = _planted(2, 10, 6, 0.4, 0.3)
    torch.library.opcheck(torch.ops.maskedssl.ncut_bipartition.default, (feats, None, 1e-5, "torch"))


@pytest.mark.parametrize("args,kwargs,err", [
    ((torch.randn(2, 1, 4),), {}, ValueError),
    ((torch.randn(5, 4),), {}, ValueError),
    ((torch.randn(2, 5, 4).long(),), {}, TypeError),
    ((torch.randn(2, 5, 4),), dict(tau=1.5), ValueError),
    ((torch.randn(2, 5, 4),), dict(eps=0.0), ValueError),
    ((torch.randn(2, 5, 4),), dict(tau="0.2"), TypeError),
])
def test_ncut_rejects(args, kwargs, err):
    with pytest.raises(err):
        ops.ncut_bipartition(*args, **kwargs)


def test_ncut_float64_runs_the_reference():
    feats, fg = _planted(2, 12, 5, 0.3, 0.2)
    res = ops.ncut_bipartition(feats.double(), backend="triton")  # no float64 kernels: falls back to torch
    ref = ops.ncut_bipartition(feats.double(), backend="torch")
    assert torch.equal(res.foreground, ref.foreground) and res.fiedler.dtype == torch.float32


def test_ncut_empty_batch_and_non_finite_features():
    res = ops.ncut_bipartition(torch.randn(0, 4, 3), backend="torch")
    assert res.fiedler.shape == (0, 4) and res.foreground.dtype == torch.bool
    bad = torch.randn(2, 4, 3)
    bad[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        ops.ncut_bipartition(bad)


def test_check_indices_argument_skips_only_the_range_check(monkeypatch):
    x = torch.randn(2, 5, 3)
    monkeypatch.setenv("MASKEDSSL_CHECK_INDICES", "0")
    with pytest.raises(ValueError):  # the argument wins over the environment
        ops.gather_tokens(x, torch.full((2, 1), 7), check_indices=True)
    monkeypatch.delenv("MASKEDSSL_CHECK_INDICES")
    bad = torch.full((2, 1), 7)
    calls = []
    monkeypatch.setattr(torch, "aminmax", lambda t: calls.append(t) or (t.min(), t.max()))
    ops.gather_tokens(x, torch.zeros(2, 1, dtype=torch.long), check_indices=False)
    ops.scatter_tokens(torch.randn(2, 1, 3), torch.zeros(2, 5, dtype=torch.long), torch.randn(3),
                       check_indices=False)
    ops.mix_patchify(torch.rand(2, 3, 4, 4), 2, partner=torch.tensor([1, 0]), lam=0.3,
                     ids_keep=torch.zeros(2, 1, dtype=torch.long), check_indices=False)
    assert calls == []
    with pytest.raises(ValueError, match="ids_keep"):
        ops.gather_tokens(x, bad)
    assert len(calls) == 1


def test_sparse_inputs_and_non_bool_check_flags_are_refused_by_name():
    x = torch.randn(2, 4, 3)
    ids = torch.tensor([[0, 2], [1, 3]])
    with pytest.raises(TypeError, match="x must be a dense"):
        ops.gather_tokens(x.to_sparse(), ids)
    with pytest.raises(TypeError, match="ids_keep must be a dense"):
        ops.gather_tokens(x, ids.to_sparse())
    for flag in (1, 0, "no"):  # also when the index is empty and there is nothing to check
        for index in (ids, ids[:, :0]):
            with pytest.raises(TypeError, match="check_indices"):
                ops.gather_tokens(x, index, check_indices=flag)
