"""ncut_bipartition: every backend against the float64 eigensolver on planted clusters, degenerate graphs,
dtypes, strides, validation, registration and compile. Triton runs here under TRITON_INTERPRET=1 on a few
small cases; the GPU tests cover both kernel backends up to N = 1024 and B = 256."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_EMULATED, cpu_kernel_backends, gpu_kernel_backends

from maskedssl.kernels.ncut import CHECK, STEPS
from maskedssl.ops import available_backends, ncut_bipartition
from maskedssl.ops.ncut import (CUDA_PARTITION_MAX_D, SEED_TIE, SPLIT_TIE, NCut, affinity, finish_partition,
                                lanczos_products)


def planted(batch, n, d, frac, noise, dtype=torch.float32, device="cpu", seed=0, with_labels=False):
    """Two clusters of patch features (round(frac * n) patches labelled 1) plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(batch, 2, d, generator=g)
    labels = torch.zeros(batch, n, dtype=torch.long)
    labels[:, : max(1, round(frac * n))] = 1
    labels = torch.gather(labels, 1, torch.argsort(torch.rand(batch, n, generator=g), dim=1))
    feats = centers.gather(1, labels.unsqueeze(-1).expand(-1, -1, d))
    feats = feats + noise * torch.randn(batch, n, d, generator=g)
    feats = feats.to(device=device, dtype=dtype)
    return (feats, labels.bool()) if with_labels else feats


def normalized_affinity(feats, tau, eps):
    """float64 M = D^-1/2 A D^-1/2 and d^1/2 of the features as the kernels see them."""
    a = affinity(feats.double().cpu(), tau, eps)
    deg = a.sum(-1)
    s = deg.rsqrt()
    return s.unsqueeze(-1) * a * s.unsqueeze(-2), deg.sqrt()


def check_against_reference(feats, tau, backend, eps=1e-5, min_gap=0.05):
    out = ncut_bipartition(feats, tau, eps, backend=backend)
    ref = ncut_bipartition(feats, tau, eps, backend="torch")
    b, n = feats.shape[:2]
    for t, dtype in zip(out, (torch.float32, torch.bool, torch.float32)):
        assert t.shape == (b, n) and t.dtype == dtype and t.device == feats.device
    out = [t.cpu() for t in out]
    fiedler, foreground, score = out
    assert torch.isfinite(fiedler).all() and torch.isfinite(score).all()
    torch.testing.assert_close(fiedler.norm(dim=1), torch.ones(b), atol=1e-5, rtol=0)
    cut = fiedler.mean(1, keepdim=True) + SPLIT_TIE * fiedler.abs().amax(1, keepdim=True)
    assert torch.equal(foreground, fiedler > cut) or n == 2
    # the partition, up to which side is called foreground
    same = (foreground == ref.foreground.cpu()).float().mean(1)
    assert torch.minimum(same, 1 - same).max() <= 0.01 or torch.maximum(same, 1 - same).min() >= 0.99, same
    m, d_sqrt = normalized_affinity(feats, tau, eps)
    evals = torch.linalg.eigvalsh(m)
    clear = evals[:, -2] - evals[:, -3] > min_gap if n > 2 else torch.ones(b, dtype=torch.bool)
    cos = (fiedler.double() * ref.fiedler.cpu().double()).sum(1).abs()
    assert (cos[clear] >= 0.999).all(), cos
    # where the vector is well defined, so is the side the seed rule calls foreground: the same as torch's
    assert (same[clear] >= 0.99).all(), same
    # eigen-residual of u = D^1/2 v (unit) against the float64 M
    u = torch.nn.functional.normalize(fiedler.double() * d_sqrt, dim=1)
    mu = torch.einsum("bij,bj->bi", m, u)
    lam = (mu * u).sum(1, keepdim=True)
    assert ((mu - lam * u).norm(dim=1) <= 1e-4).all()
    return out, ref


CPU_CASES = [  # (n, d, frac, noise, tau, dtype)
    (16, 32, 0.3, 0.5, None, torch.float32),
    (49, 40, 0.1, 1.0, 0.2, torch.bfloat16),
    (3, 8, 0.3, 0.3, None, torch.float16),
]


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: f"n{c[0]}-d{c[1]}-tau{c[4]}-{str(c[5])[6:]}")
def test_planted_clusters_cpu(backend, case):
    n, d, frac, noise, tau, dtype = case
    check_against_reference(planted(2, n, d, frac, noise, dtype), tau, backend)


# Triton: N > 128 takes the two-kernel path (affinity in a workspace, the solver streaming it). CUDA: A stays
# in shared memory while N^2 floats fit (N <= ~236 on an H100, 241 in the emulator), then every product
# streams G; N = 1000 and 1024 give every thread four entries. The interpreter keeps Triton to N <= 300.
LARGE_N = [(b, n) for b in cpu_kernel_backends()
           for n in ((196, 300) if b == "triton" else (196, 300, 1000, 1024))]


@pytest.mark.parametrize("backend,n", LARGE_N)
def test_large_n_paths_cpu(backend, n):
    check_against_reference(planted(1, n, 24, 0.3, 1.0, torch.float16), None, backend)


@pytest.mark.parametrize("tau", [None, 0.2])
def test_triton_tiled_path_with_the_partition_from_the_cosines_cpu(tau):
    """N > 128 with 16-bit features and N <= D: the solver applies the affinity rule (both graphs) to the
    cosines it streams, and the partition step reads them too."""
    if "triton" not in cpu_kernel_backends():
        pytest.skip("Triton runs on CPU only under TRITON_INTERPRET=1")
    check_against_reference(planted(2, 150, 160, 0.3, 1.0, torch.bfloat16, seed=3), tau, "triton")


def test_reference_finds_planted_clusters():
    for frac, noise in [(0.3, 0.5), (0.1, 1.0), (0.3, 2.0)]:
        feats, labels = planted(4, 64, 96, frac, noise, seed=1, with_labels=True)
        # the planted labels are recovered, up to which side is the foreground
        same = (ncut_bipartition(feats).foreground == labels).float().mean(1)
        assert torch.maximum(same, 1 - same).min() >= (1.0 if noise <= 1.0 else 0.95)


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
@pytest.mark.parametrize("tau", [None, 0.2])
def test_degenerate_inputs(backend, tau):
    n, d = 8, 16
    same = torch.randn(1, 1, d).expand(1, n, d).contiguous()
    zeros = torch.zeros(1, n, d)
    some_zero = torch.randn(1, n, d)
    some_zero[:, ::3] = 0
    pair = torch.randn(1, 2, d)
    one_sign_1d = torch.rand(1, n, 1) + 0.5  # every cosine 1, up to rounding
    for feats in (same, zeros, some_zero, pair, one_sign_1d):
        first = ncut_bipartition(feats, tau, backend=backend)
        again = ncut_bipartition(feats, tau, backend=backend)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
        assert torch.isfinite(first.fiedler).all() and torch.isfinite(first.score).all()
        assert first.foreground.any()
        torch.testing.assert_close(first.fiedler.norm(dim=1), torch.ones(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_ties_and_degenerate_graphs_give_the_torch_backends_answer(backend):
    """Where the seed ties exactly (N = 2; two equal clusters of a binary graph) each backend's rounding
    used to pick the foreground side (19% of N = 2 samples flipped against torch). Where the Fiedler vector
    is not unique (identical or zero features, a constant affinity), torch returned whatever eigh chose
    (two identical zero samples got complementary cuts) and the kernels their start vector's projection:
    the reference now takes that projection too."""
    gen = torch.Generator().manual_seed(0)
    halves = torch.cat([torch.ones(1, 4, 3), -torch.ones(1, 4, 3)], 1)
    cases = [
        (torch.randn(64, 2, 8, generator=gen), None, 1e-5),
        (planted(16, 32, 16, 0.5, 0.3, seed=64), 0.2, 1e-5),
        (halves, 0.0, 1e-5), (halves, 0.5, 1e-5),
        (torch.zeros(2, 9, 6), None, 1e-5),
        (torch.randn(1, 1, 6, generator=gen).expand(3, 9, 6), None, 1e-5),
        (torch.randn(2, 9, 6, generator=gen), None, 1.0),  # eps = 1: every affinity 1
    ]
    # (D = 1 features of one sign have cosines of 1 only up to each backend's rounding of the Gram matrix:
    # the kernels then cut along that rounding noise, a valid partition that test_degenerate_inputs checks)
    for feats, tau, eps in cases:
        want = ncut_bipartition(feats, tau, eps, backend="torch")
        got = ncut_bipartition(feats, tau, eps, backend=backend)
        assert torch.equal(got.foreground, want.foreground), (feats.shape, tau, eps)
        torch.testing.assert_close(got.fiedler, want.fiedler, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.score, want.score, atol=1e-5, rtol=0)
        if feats.shape[0] > 1 and (feats == feats[:1]).all():  # identical samples, identical cuts
            assert (want.foreground == want.foreground[:1]).all()


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
def test_scores_are_cosines_after_rounding(backend):
    # N = 2: each patch is the foreground mean of a one-patch side, a cosine of 1 that rounded up to 1 + 2 ulp
    score = ncut_bipartition(torch.randn(256, 2, 8, generator=torch.Generator().manual_seed(0)),
                             backend=backend).score
    assert score.abs().max() <= 1.0 and (score >= 1 - 1e-6).sum() == 256


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
def test_two_equal_halves_of_identical_rows(backend):
    # a rank-2 graph: Lanczos sees the Fiedler vector only through the start vector, which once was
    # orthogonal to it for equal contiguous halves (N = 48, 64, 100) and returned a null-space vector
    for n in (48, 64):
        pair = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(n))
        halves = torch.cat([pair[:, :1].expand(-1, n // 2, -1), pair[:, 1:].expand(-1, n // 2, -1)], dim=1)
        opposite = torch.cat([torch.ones(1, n // 2, 4), -torch.ones(1, n // 2, 4)], dim=1)
        for feats in (halves, opposite):
            fiedler, foreground, _ = check_against_reference(feats, None, backend)[0]
            assert torch.equal(foreground[:, : n // 2].all(1) | foreground[:, n // 2:].all(1),
                               torch.ones(feats.shape[0], dtype=torch.bool))
            assert (foreground.sum(1) == n // 2).all()


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
def test_huge_and_tiny_features_give_the_cut_of_their_direction(backend):
    # squared norms of these overflow or underflow fp32 (float64 for 1e200 / 1e-200): the op scales each
    # such row by a power of two first
    base = planted(2, 12, 16, 0.3, 0.5, torch.float64)
    for scale, dtype in ((1e20, torch.float32), (1e37, torch.float32), (1e200, torch.float64),
                         (1e-25, torch.float32), (2.0 ** -100, torch.bfloat16), (1e-200, torch.float64)):
        big = ncut_bipartition((base * scale).to(dtype), backend=backend)
        ref = ncut_bipartition(base.to(dtype), backend=backend)
        assert torch.equal(big.foreground, ref.foreground)
        torch.testing.assert_close(big.score, ref.score, atol=1e-5, rtol=0)
        torch.testing.assert_close(big.fiedler, ref.fiedler, atol=1e-5, rtol=0)
    # rows of very different magnitudes in one sample: each is scaled on its own
    mixed = base.float()
    mixed[0, :5] *= 1e-30
    out = ncut_bipartition(mixed, backend=backend)
    ref = ncut_bipartition(mixed.double(), backend="torch")
    assert ((out.fiedler * ref.fiedler).sum(1).abs() >= 0.999).all()


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
def test_scaling_one_sample_leaves_the_others_alone(backend):
    # a row of norm 1e-13 is in range (not scaled) but under F.normalize's 1e-12 floor: it must read the
    # same whether or not another sample of the batch has rows that need scaling
    feats = planted(2, 12, 16, 0.3, 0.5)
    feats[0, 3] *= 1e-13 / feats[0, 3].norm()
    alone = ncut_bipartition(feats[:1], backend=backend)
    feats[1] *= 2.0 ** 60
    together = ncut_bipartition(feats, backend=backend)
    assert torch.equal(together.foreground[:1], alone.foreground)
    torch.testing.assert_close(together.fiedler[:1], alone.fiedler, atol=1e-6, rtol=0)
    torch.testing.assert_close(together.score[:1], alone.score, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
@pytest.mark.parametrize("n,first", [(10, 3), (49, 20)])
def test_disconnected_clusters_with_a_tiny_eps(backend, n, first):
    # Features of two clusters on disjoint supports: every cosine between them is 0, their affinity eps, and
    # with eps -> 0 the graph falls apart: 1 is a double eigenvalue of M. The Fiedler vector is still the one
    # orthogonal to D^1/2 1 (the reference deflates it as the kernels do), constant on each cluster.
    g = torch.Generator().manual_seed(n)
    feats = torch.zeros(2, n, 8)
    feats[:, :first, :4] = torch.rand(2, first, 4, generator=g) + 0.1
    feats[:, first:, 4:] = torch.rand(2, n - first, 4, generator=g) + 0.1
    order = torch.randperm(n, generator=g)
    feats, cluster = feats[:, order], (order < first).expand(2, n)
    for eps in (1e-40, 1e-12):
        out, _ = check_against_reference(feats, None, backend, eps=eps)
        assert torch.equal(out[1], cluster) or torch.equal(out[1], ~cluster)


@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_zero_rows_with_a_tiny_eps_keep_the_cut(backend):
    """A zero row has degree N eps, and v = D^-1/2 u divides the solver's ~1e-6 error in u by sqrt(N eps):
    with the kernels' eps floored at 1e-30, eps = 1e-16 gave a wrong cut and 1e-20 a foreground of one zero
    row. Floored at KERNEL_MIN_EPS they give the float64 reference's cut at every eps. And an all-zero sample
    with N^2 eps below 1e-24 once left the reference's deflated vector unscaled (normalize's 1e-12 floor):
    it must give the start vector's projection, as at larger eps and as the kernels do."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(2, 40, generator=g)
    feats = centers[torch.tensor([0] * 4 + [1] * 8)] + 0.5 * torch.randn(12, 40, generator=g)
    feats[[0, 5]] = 0
    for eps in (1e-5, 1e-12, 1e-16, 1e-20):
        want = ncut_bipartition(feats[None], None, eps, backend="torch")
        got = ncut_bipartition(feats[None], None, eps, backend=backend)
        assert torch.equal(got.foreground, want.foreground), eps
        assert (got.fiedler * want.fiedler).sum().abs() >= 0.999
    zeros = torch.zeros(1, 12, 40)
    alternate = torch.arange(12) % 2 == 0
    for eps in (1e-5, 1e-27):
        for b in ("torch", backend):
            cut = ncut_bipartition(zeros, None, eps, backend=b)
            assert torch.equal(cut.foreground[0], alternate), (b, eps)


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
def test_tiny_eps_stays_finite(backend):
    # eps underflows fp32 (and D^-1/2 ~ 1/sqrt(N eps) overflows it): zero rows must not give NaN
    some_zero = planted(1, 8, 16, 0.3, 0.5)
    some_zero[:, ::3] = 0
    for feats in (torch.zeros(1, 6, 4), some_zero):
        for eps in (1e-40, 1e-300):
            out = ncut_bipartition(feats, eps=eps, backend=backend)
            assert torch.isfinite(out.fiedler).all() and torch.isfinite(out.score).all()
            torch.testing.assert_close(out.fiedler.norm(dim=1), torch.ones(1), atol=1e-5, rtol=0)
            assert out.foreground.any()


@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_non_contiguous_cpu(backend):
    base = planted(2, 24, 40, 0.3, 0.5).transpose(1, 2).contiguous().transpose(1, 2)[:, :, :33]
    assert not base.is_contiguous()
    out = ncut_bipartition(base, backend=backend)
    ref = ncut_bipartition(base.contiguous(), backend=backend)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_validation():
    good = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match="feats"):
        ncut_bipartition(good.numpy())
    with pytest.raises(ValueError, match="feats"):
        ncut_bipartition(good[0])
    with pytest.raises(TypeError, match="feats"):
        ncut_bipartition(good.half().view(torch.int16))
    with pytest.raises(TypeError, match="feats"):
        ncut_bipartition(good.long())
    with pytest.raises(ValueError, match="N >= 2"):
        ncut_bipartition(good[:, :1])
    with pytest.raises(ValueError, match="tau"):
        ncut_bipartition(good, tau=1.0)
    with pytest.raises(ValueError, match="tau"):
        ncut_bipartition(good, tau=-1.5)
    with pytest.raises(TypeError, match="tau"):
        ncut_bipartition(good, tau="0.2")
    with pytest.raises(TypeError, match="tau"):
        ncut_bipartition(good, tau=True)
    with pytest.raises(ValueError, match="eps"):
        ncut_bipartition(good, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        ncut_bipartition(good, eps=2.0)
    with pytest.raises(TypeError, match="eps"):
        ncut_bipartition(good, eps=None)
    with pytest.raises(ValueError, match="backend"):
        ncut_bipartition(good, backend="numpy")


def test_no_gradient():
    feats = torch.randn(1, 6, 8, requires_grad=True)
    out = ncut_bipartition(feats)
    assert not any(t.requires_grad for t in out)


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
def test_opcheck(backend):
    feats = planted(1, 8, 16, 0.3, 0.5)
    for tau in (None, 0.2):
        torch.library.opcheck(torch.ops.maskedssl.ncut_bipartition.default, (feats, tau, 1e-5, backend))


@pytest.mark.skipif(not CUDA_EMULATED, reason="the CUDA kernels run on CPU only under tests/cuda_emu")
def test_opcheck_cuda_entry_point_emulated():
    feats = planted(2, 12, 16, 0.3, 0.5)
    for tau, count in ((None, False), (0.2, True)):
        torch.library.opcheck(torch.ops.maskedssl.ncut_fiedler_cuda.default, (feats, tau, 1e-5, count))


# ----------------------------------------------------------------------------- partition step
def _partition_inputs(b, n, d, dtype, seed=0):
    """Features (a zero row first) and a vector v of each sample to split."""
    g = torch.Generator().manual_seed(seed)
    feats = (3 * torch.randn(b, n, d, generator=g)).to(dtype)
    feats[0, 0] = 0  # a zero row scores 0, as F.normalize leaves it
    return feats, torch.randn(b, n, generator=g) * 1e-3


def _check_partition(got, want):
    assert [(t.dtype, t.shape) for t in got] == [(t.dtype, t.shape) for t in want]
    assert torch.equal(got.foreground, want.foreground)
    torch.testing.assert_close(got.fiedler, want.fiedler, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.score, want.score, atol=2e-6, rtol=0)


@pytest.mark.parametrize("backend", cpu_kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_partition_kernels_match_the_reference_rules(backend, dtype):
    """The kernels' partition step (sign, split, seed and scores in one launch, the features read twice in
    their own dtype) against the reference's split_partition + foreground_scores on the same v: odd and
    wide D, strided and misaligned views, a zero row."""
    shapes = [(2, 5, 1), (3, 49, 100), (2, 64, 768), (1, 2, 3), (2, 17, CUDA_PARTITION_MAX_D), (2, 300, 24)]
    for b, n, d in shapes:
        feats, v = _partition_inputs(b, n, d, dtype)
        want = finish_partition(feats, v)
        views = [feats, feats.transpose(1, 2).contiguous().transpose(1, 2),
                 torch.cat([feats[..., :1], feats], dim=-1)[..., 1:]]  # rows 2 bytes off 16-byte alignment
        for view in views:
            _check_partition(finish_partition(view, v, backend), want)
        _check_partition(finish_partition(feats, v.t().contiguous().t(), backend), want)


@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_partition_kernels_take_the_reference_ties(backend):
    """Seed ties within SEED_TIE (the lowest index wins), a constant v (everything is foreground), v = 0,
    N = 2 with |v_0| = |v_1|, and a foreground made only of zero rows (m = 0: scores 0, not NaN)."""
    feats, _ = _partition_inputs(6, 8, 16, torch.float32)
    v = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    v[0] = 0.5
    v[1] = 0
    v[2, 3], v[2, 6] = 4.0, -4.0 * (1 - 0.5 * SEED_TIE)  # tied for the seed: index 3 wins
    v[3, :2], v[3, 2:] = 1.0, -1.0
    v[4] = torch.tensor([7.0, -1, -1, -1, -1, -1, -1, -1])
    feats[4, 0] = 0  # the foreground is entry 0 alone, a zero row
    pair = torch.tensor([[1.0, -1.0], [-2.0, 2.0]])
    for f, vv in ((feats, v), (torch.randn(2, 2, 4), pair)):
        want = finish_partition(f, vv)
        got = finish_partition(f, vv, backend)
        _check_partition(got, want)
    assert torch.equal(finish_partition(feats, v, backend).score[4], torch.zeros(8))


def _mean_tie_inputs():
    """v = e_0 - e_1 plus ~1e-9 noise (what rounding leaves of an exact tie at the mean: a binary graph where
    one pair of patches is cut), one sample with entry 2 at 1e-4 above the mean; and the right foreground:
    row 0 (the seed, tied with row 1, the lowest index), and row 2 in sample 1."""
    feats, _ = _partition_inputs(2, 40, 48, torch.bfloat16)
    v = 1e-9 * torch.randn(2, 40, generator=torch.Generator().manual_seed(5))
    v[:, 0], v[:, 1] = 1.0, -1.0
    v[1, 2] = 1e-4
    want = torch.zeros(2, 40, dtype=torch.bool)
    want[:, 0] = want[1, 2] = True
    return feats, v, want


MEAN_TIE_PATHS = ["torch", *cpu_kernel_backends(), *(["cuda_gram"] if CUDA_EMULATED else []),
                  *(["triton_cos"] if "triton" in cpu_kernel_backends() else [])]


@pytest.mark.parametrize("path", MEAN_TIE_PATHS)
def test_partition_takes_entries_at_the_mean_to_the_background(path):
    """Entries within SPLIT_TIE max |v| of the mean are not foreground on every path of the partition step
    (without the margin, about half of rows 2-39 were, by the noise's sign), and 1e-4 above is."""
    from maskedssl.kernels.ncut import partition_from_cos

    feats, v, want = _mean_tie_inputs()
    if path == "triton_cos":
        got = NCut(*partition_from_cos(feats, _cosines(feats), v, SEED_TIE, SPLIT_TIE))
    elif path == "cuda_gram":
        got = NCut(*torch.ops.maskedssl.ncut_partition_gram_cuda(feats, _gram(feats), v, SEED_TIE, SPLIT_TIE))
    else:
        got = finish_partition(feats, v, path)
    assert torch.equal(got.foreground, want)
    assert (got.fiedler[:, 0] > 0).all()


def _one_cut_pair(n, dtype, device="cpu"):
    """Features whose binary graph (tau = 0.2) lacks one edge, between rows 0 and 1 (orthogonal); all other
    rows are near (1, 1, ...). Swapping rows 0 and 1 is a symmetry: the Fiedler vector is e_0 - e_1, exactly
    0 (the mean) elsewhere."""
    g = torch.Generator().manual_seed(n)
    feats = 1.0 + 0.01 * torch.randn(2, n, 8, generator=g)
    feats[:, :2] = 0
    feats[:, 0, 0] = feats[:, 1, 1] = 1.0
    return feats.to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend,device", [
    ("torch", "cpu"), *((b, "cpu") for b in cpu_kernel_backends()),
    *(pytest.param(b, "cuda", marks=pytest.mark.gpu) for b in gpu_kernel_backends() or ["triton", "cuda"])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_cut_pair_gives_the_same_foreground_on_every_backend(backend, device, dtype):
    """End to end on the graph of _one_cut_pair, on chip and tiled (N = 150): the foreground is row 0 alone
    (rows 2.. sit exactly at the mean), not a rounding-decided half of the rest (4 of 12 rows differed
    between the backends before the SPLIT_TIE margin)."""
    for n in (12, 40, 150):
        feats = _one_cut_pair(n, dtype, device)
        out = ncut_bipartition(feats if backend != "torch" else feats.double(), 0.2, backend=backend)
        want = torch.zeros(2, n, dtype=torch.bool)
        want[:, 0] = True
        assert torch.equal(out.foreground.cpu(), want), (n, out.foreground.sum(1))


@pytest.mark.parametrize("backend,device", [
    ("torch", "cpu"), *((b, "cpu") for b in cpu_kernel_backends()),
    *(pytest.param(b, "cuda", marks=pytest.mark.gpu) for b in gpu_kernel_backends() or ["triton", "cuda"])])
def test_a_row_of_zeros_keeps_its_entry_from_the_eigen_equation(backend, device):
    """A row of zeros has degree N eps, and v = D^-1/2 u multiplied the solver's error in its entry by
    1 / sqrt(N eps): on the cut pair's graph with one zero row (whose exact entry, sum(v) / (N theta), is the
    mean, like the other rows') that entry was 1e-4 to 1.2e-2 max |v| off, which moved the mean past the
    other rows: 38 of 40 and 148 of 150 rows went to the foreground on both kernel backends. The kernels
    take that entry from the eigen-equation instead. The foreground is row 0, and every other row but the
    zero row is out; the zero row, at the mean up to the other rows' rounding divided by N theta - 1 (0.05
    at N = 40, 0.014 at N = 150), may come out above it past SPLIT_TIE (by up to 6e-6 max |v| here).
    (At larger N the zero row's own eigenvalue, about 1 / N, comes within a few 1e-5 of the Fiedler one,
    1 / (N - 2): an unclear eigengap, where the kernels' vector mixes the two.)"""
    for n in (12, 40, 150):
        feats = _one_cut_pair(n, torch.float32, device)
        zero = n // 2
        feats[:, zero] = 0
        out = ncut_bipartition(feats if backend != "torch" else feats.double(), 0.2, backend=backend)
        fg = out.foreground.cpu()
        assert fg[:, 0].all() and not fg[:, 1:zero].any() and not fg[:, zero + 1:].any(), (n, fg.sum(1))
        fiedler = out.fiedler.cpu().double()
        off = (fiedler[:, zero] - fiedler.mean(1)).abs() / fiedler.abs().amax(1)
        assert (off <= 5e-5).all(), (n, off)
        if backend == "torch" or n == 12:
            assert not fg[:, zero].any()


@pytest.mark.parametrize("backend", cpu_kernel_backends())
@pytest.mark.parametrize("tau", [None, 0.2])
def test_rows_of_zeros_in_planted_clusters_give_the_reference_partition(backend, tau):
    """One or four zero rows among two planted clusters: the kernels' partition equals the float64
    reference's in every sample (before the zero rows' entries came from the eigen-equation, at N = 16 from 2
    to 13 of 64 samples differed per case on the triton backend and 5 to 16 on the cuda one, in the zero
    rows or in rows their error pushed across the mean). N = 150 and 250 run the solvers' paths for large N
    (Triton's tiled one; CUDA's without A in shared memory), which gave the reference's partition before
    too."""
    large = 150 if backend == "triton" else 250
    for batch, n, zeros in ((64, 16, 1), (64, 16, 4), (4, large, 9)):
        feats = planted(batch, n, 8, 0.4, 0.4, seed=zeros)
        feats[:, torch.randperm(n, generator=torch.Generator().manual_seed(zeros))[:zeros]] = 0
        want = ncut_bipartition(feats.double(), tau, backend="torch")
        got = ncut_bipartition(feats, tau, backend=backend)
        differ = (got.foreground != want.foreground).sum(1)
        assert torch.equal(got.foreground, want.foreground), (n, zeros, differ)


@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_partition_past_the_kernels_width_takes_the_reference(backend):
    from maskedssl.kernels.ncut import PARTITION_MAX_D

    d = (CUDA_PARTITION_MAX_D if backend == "cuda" else PARTITION_MAX_D) + 1
    feats, v = _partition_inputs(1, 3, d, torch.float32)
    for got, want in zip(finish_partition(feats, v, backend), finish_partition(feats, v)):
        assert torch.equal(got, want)


@pytest.mark.skipif(not CUDA_EMULATED, reason="the CUDA kernels run on CPU only under tests/cuda_emu")
def test_partition_cuda_entry_point_emulated():
    feats, v = _partition_inputs(2, 9, 16, torch.bfloat16)
    torch.library.opcheck(torch.ops.maskedssl.ncut_partition_cuda.default, (feats, v, 1e-4, 1e-6))
    with pytest.raises(RuntimeError, match="v must be a"):
        torch.ops.maskedssl.ncut_partition_cuda(feats, v.double(), 1e-4, 1e-6)
    with pytest.raises(RuntimeError, match="D in"):
        torch.ops.maskedssl.ncut_partition_cuda(torch.zeros(1, 2, CUDA_PARTITION_MAX_D + 1), v[:1, :2], 1e-4,
                                                 1e-6)


def _gram(feats):
    """F F^T in float32 as the solver hands it on (16-bit products are exact in fp32)."""
    return torch.bmm(feats.float(), feats.float().transpose(1, 2))


CUDA_KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not CUDA_EMULATED, reason="the CUDA kernels run on CPU only "
                                                                           "under tests/cuda_emu")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_partition_from_the_gram_matrix_matches_the_reference_rules(dtype, device):
    """ncut_partition_gram_cuda (the partition step from G = F F^T, which the CUDA path takes for 16-bit
    features with N <= D) against the reference on the same v: N from 2 to the kernel's 1024, a zero row,
    a non-contiguous G and v."""
    shapes = [(2, 5, 16), (3, 49, 100), (2, 64, 768), (1, 2, 3), (2, 300, 24), (1, 1024, 8)]
    if device == "cuda":
        shapes.append((256, 196, 768))
    for b, n, d in shapes:
        feats, v = (t.to(device) for t in _partition_inputs(b, n, d, dtype))
        want = finish_partition(feats, v)
        gram = _gram(feats)
        _check_partition(NCut(*torch.ops.maskedssl.ncut_partition_gram_cuda(feats, gram, v, SEED_TIE,
                                                                             SPLIT_TIE)), want)
        feats_t = feats.transpose(1, 2).contiguous().transpose(1, 2)
        strided = torch.ops.maskedssl.ncut_partition_gram_cuda(feats_t, gram.transpose(1, 2),
                                                               v.t().contiguous().t(), SEED_TIE, SPLIT_TIE)
        _check_partition(NCut(*strided), want)


def _tie_inputs():
    """Six samples for the partition steps from G or C: seed ties within SEED_TIE, a constant v, v = 0,
    a split of two blocks, a foreground of one zero row (sample 4) and one of two rows that cancel exactly
    (sample 5: scores 0, as the reference gives)."""
    feats, _ = _partition_inputs(6, 8, 16, torch.float32)
    v = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    v[0] = 0.5
    v[1] = 0
    v[2, 3], v[2, 6] = 4.0, -4.0 * (1 - 0.5 * SEED_TIE)
    v[3, :2], v[3, 2:] = 1.0, -1.0
    v[4] = torch.tensor([7.0, -1, -1, -1, -1, -1, -1, -1])
    feats[4, 0] = 0
    v[5] = torch.tensor([2.0, 2, -1, -1, -1, -1, -1, -1])  # the foreground: rows 0 and 1
    feats[5, 1] = -feats[5, 0]
    return feats, v


@pytest.mark.skipif(not CUDA_EMULATED, reason="the CUDA kernels run on CPU only under tests/cuda_emu")
def test_cuda_partition_from_the_gram_matrix_takes_the_reference_ties():
    """The cases of test_partition_kernels_take_the_reference_ties, from G: seed ties, a constant v, v = 0,
    N = 2 with |v_0| = |v_1|, a foreground of zero rows (scores 0), and rows that cancel exactly (f and -f
    in the foreground: m = 0 up to their pairing, scores 0 as the reference gives)."""
    feats, v = _tie_inputs()
    for f, vv in ((feats, v), (torch.randn(2, 2, 4), torch.tensor([[1.0, -1.0], [-2.0, 2.0]]))):
        got = NCut(*torch.ops.maskedssl.ncut_partition_gram_cuda(f, _gram(f), vv, SEED_TIE, SPLIT_TIE))
        _check_partition(got, finish_partition(f, vv))
        if f is feats:
            assert torch.equal(got.score[4], torch.zeros(8)) and torch.equal(got.score[5], torch.zeros(8))


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_gram_partition_redoes_a_cancelling_foreground_from_the_features(dtype, device):
    """|m|^2 from G carries G's rounding relative to the row norms, so the scores' error grows as
    1 / |mean unit row|^2: exact cancellation (f and -f of different norms in the foreground) gave scores of
    +-1 where the reference gives 0, and pairs f, -f + 0.01 noise (|mean| ~ 1e-3) 3.5e-4 off. Those samples
    are redone from the features (a random sample beside each in the batch is not)."""
    g = torch.Generator().manual_seed(0)
    exact = torch.zeros(4, 4)
    exact[:, 0] = torch.tensor([0.375, 3.375, -0.875, -0.25])
    base = torch.randn(32, 96, generator=g)
    pairs = torch.stack([base, -base + 0.01 * torch.randn(32, 96, generator=g)], 1).reshape(64, 96)
    for feats, v in ((exact[None], torch.tensor([[1.0, -1, 1, -1]])),  # foreground rows 0, 2: +e1, -e1
                     (pairs[None], torch.ones(1, 64)),  # everything foreground
                     (pairs[None], torch.linspace(1, -1, 64)[None])):  # the first half
        feats = torch.cat([feats, torch.randn(feats.shape, generator=g)]).to(device=device, dtype=dtype)
        v = torch.cat([v, v]).to(device)
        want = finish_partition(feats, v)
        got = NCut(*torch.ops.maskedssl.ncut_partition_gram_cuda(feats, _gram(feats), v, SEED_TIE, SPLIT_TIE))
        assert torch.equal(got.foreground, want.foreground)
        torch.testing.assert_close(got.fiedler, want.fiedler, atol=1e-6, rtol=0)
        # |mean| ~ 1e-3: the float32 reference and the feature kernel are each ~3e-6 off the exact scores
        torch.testing.assert_close(got.score, want.score, atol=1e-5, rtol=0)
    exact_got = torch.ops.maskedssl.ncut_partition_gram_cuda(*(t.to(device) for t in (
        exact[None].to(dtype), _gram(exact[None].to(dtype)), torch.tensor([[1.0, -1, 1, -1]]))), SEED_TIE,
        SPLIT_TIE)
    assert torch.equal(exact_got[2].cpu(), torch.zeros(1, 4))


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_op_in_one_call_equals_solver_then_partition(dtype, device):
    """ncut_bipartition_cuda (what the op runs on the cuda backend) against the two-call path it replaced,
    ncut_fiedler_cuda then the feature partition: the same Fiedler vector and cut (bit for bit), scores
    within fp32 rounding where it reads them from G (16-bit, N <= D) and bit for bit where it reads the
    features (N > D, or fp32)."""
    cases = [(3, 49, 100, None), (2, 64, 64, 0.2), (2, 100, 24, None), (1, 2, 3, 0.0)]
    if device == "cuda":
        cases += [(256, 196, 768, None), (16, 576, 384, 0.2), (4, 1024, 192, None)]
    for b, n, d, tau in cases:
        feats = planted(b, n, d, 0.3, 0.5, dtype, device=device, seed=n)
        v = torch.ops.maskedssl.ncut_fiedler_cuda(feats, tau, 1e-5)[0]
        want = finish_partition(feats, v, "cuda")
        got = NCut(*torch.ops.maskedssl.ncut_bipartition_cuda(feats, None, tau, 1e-5, SEED_TIE, SPLIT_TIE))
        assert torch.equal(got.fiedler, want.fiedler) and torch.equal(got.foreground, want.foreground)
        if dtype != torch.float32 and n <= d:
            torch.testing.assert_close(got.score, want.score, atol=2e-6, rtol=0)
        else:
            assert torch.equal(got.score, want.score)
        ops_out = ncut_bipartition(feats, tau, 1e-5, backend="cuda")
        assert all(torch.equal(x, y) for x, y in zip(ops_out, got))


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
def test_cuda_gram_and_one_call_entry_points(device):
    feats, v = (t.to(device) for t in _partition_inputs(2, 9, 16, torch.bfloat16))
    gram = _gram(feats)
    torch.library.opcheck(torch.ops.maskedssl.ncut_partition_gram_cuda.default, (feats, gram, v, 1e-4, 1e-6))
    for tau in (None, 0.2):
        for given in (None, gram):
            torch.library.opcheck(torch.ops.maskedssl.ncut_bipartition_cuda.default,
                                  (feats, given, tau, 1e-5, 1e-4, 1e-6))
    with pytest.raises(RuntimeError, match="gram must be"):
        torch.ops.maskedssl.ncut_partition_gram_cuda(feats, gram[:, :, :8], v, 1e-4, 1e-6)
    with pytest.raises(RuntimeError, match="gram must be"):
        torch.ops.maskedssl.ncut_partition_gram_cuda(feats, gram.double(), v, 1e-4, 1e-6)
    with pytest.raises(RuntimeError, match="v must be"):
        torch.ops.maskedssl.ncut_partition_gram_cuda(feats, gram, v[:, :8], 1e-4, 1e-6)
    empty = torch.ops.maskedssl.ncut_bipartition_cuda(feats[:0], None, None, 1e-5, 1e-4, 1e-6)
    assert [t.shape for t in empty] == [(0, 9)] * 3


@pytest.mark.parametrize("device", CUDA_KERNEL_DEVICES)
def test_cuda_check_reads_the_gram_diagonal_not_the_features(device, monkeypatch):
    """On the cuda backend the input check reads the diagonal of the Gram matrix the solver then uses: the
    features are read a second time (``_checked_features``) only for a row whose squared norm is outside
    [2^-80, 2^100) (zero, NaN and inf rows included), G goes to the solver unless rows were rescaled, and
    the result is bit for bit the unchecked op's."""
    from maskedssl.ops import ncut as ncut_module

    reads, grams = [], []
    checked, one_call = ncut_module._checked_features, torch.ops.maskedssl.ncut_bipartition_cuda
    monkeypatch.setattr(ncut_module, "_checked_features", lambda f: reads.append(1) or checked(f))
    monkeypatch.setattr(torch.ops.maskedssl, "ncut_bipartition_cuda",
                        lambda f, gram, *rest: grams.append(gram is not None) or one_call(f, gram, *rest))

    def run(feats, checks=True):
        monkeypatch.setenv("MASKEDSSL_CHECK_INDICES", "1" if checks else "0")
        reads.clear()
        grams.clear()
        return ncut_bipartition(feats, backend="cuda"), len(reads), grams == [True]

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n, d in ((12, 16), (20, 8)):  # the partition from G (N <= D) and from the features
            feats = planted(2, n, d, 0.3, 0.5, dtype, device=device, seed=n)
            got, read, reused = run(feats)
            want, _, _ = run(feats, checks=False)
            assert (read, reused) == (0, True), (dtype, n, d)
            assert all(torch.equal(x, y) for x, y in zip(got, want)), (dtype, n, d)
    # G goes to the solver unless rows were rescaled
    _check_norm_boundaries(run, planted(2, 12, 16, 0.3, 0.5, device=device), lambda rescaled: not rescaled)


def _check_norm_boundaries(run, base, workspace_flag):
    """The boundary cases of the kernel backends' norm checks, set in row 3 of sample 1 of ``base``.
    ``run(feats, checks=True)`` returns (the result, how often ``_checked_features`` ran, a flag of what
    became of the workspace), and ``workspace_flag(rescaled)`` is the flag expected. A squared norm of
    2^-80 or just under 2^100 is in range; 2^100 (rescaled), a zero row, a norm of 2^-41 (not rescaled) or
    an inf entry is not; NaN and inf raise."""
    device = base.device
    row = torch.zeros(base.shape[-1], device=device)
    # (value, dtype, features read again, rows rescaled)
    cases = [(2.0 ** -40, torch.bfloat16, False, False), (2.0 ** 50 - 2.0 ** 42, torch.float32, False, False),
             (2.0 ** 50, torch.float32, True, True), (0.0, torch.bfloat16, True, False),
             (2.0 ** -41, torch.bfloat16, True, False)]
    for value, dtype, again, rescaled in cases:
        feats = base.clone()
        feats[1, 3] = row.index_fill(0, torch.tensor([5], device=device), value)
        feats = feats.to(dtype)
        got, read, flag = run(feats)
        assert (read, flag) == (int(again), workspace_flag(rescaled)), value
        if not rescaled:
            want, _, _ = run(feats, checks=False)
            assert all(torch.equal(x, y) for x, y in zip(got, want)), value
        want = ncut_bipartition(feats.double(), backend="torch")
        assert torch.equal(got.foreground.cpu(), want.foreground.cpu()), value
    for where in ((1, 3, 5), (0, 2, 7)):
        for value in (float("inf"), float("nan")):
            bad = base.clone()
            bad[where] = value
            with pytest.raises(ValueError, match="finite"):
                run(bad)


TRITON_KERNEL_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif("triton" not in cpu_kernel_backends(),
                                                 reason="Triton runs on CPU only under TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


def _cosines(feats):
    """The tiled Triton solver's workspace: cosines of the rows (zero rows give 0)."""
    f = torch.nn.functional.normalize(feats.float(), dim=-1)
    return torch.bmm(f, f.transpose(1, 2))


@pytest.mark.parametrize("device", TRITON_KERNEL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_triton_partition_from_the_cosines_matches_the_reference_rules(dtype, device):
    """partition_from_cos (the Triton partition step from the solver's cosines, which the op takes for
    16-bit features with N <= D, 2 N <= D for N <= 128) against the reference on the same v: odd N, a zero
    row, N = 2, a non-contiguous C and v."""
    from maskedssl.kernels.ncut import partition_from_cos

    shapes = [(2, 5, 16), (3, 49, 100), (2, 150, 200), (1, 2, 3), (1, 300, 24)]
    if device == "cuda":
        shapes += [(256, 196, 768), (8, 576, 768)]
    for b, n, d in shapes:
        feats, v = (t.to(device) for t in _partition_inputs(b, n, d, dtype))
        want = finish_partition(feats, v)
        cos = _cosines(feats)
        _check_partition(NCut(*partition_from_cos(feats, cos, v, SEED_TIE, SPLIT_TIE)), want)
        strided = partition_from_cos(feats, cos.transpose(1, 2), v.t().contiguous().t(), SEED_TIE, SPLIT_TIE)
        _check_partition(NCut(*strided), want)


@pytest.mark.parametrize("device", TRITON_KERNEL_DEVICES)
def test_triton_partition_from_the_cosines_takes_the_reference_ties(device):
    """The cases of test_partition_kernels_take_the_reference_ties, from C: seed ties, a constant v, v = 0,
    N = 2, a foreground of zero rows and one of rows that cancel exactly (scores 0, as the reference)."""
    from maskedssl.kernels.ncut import partition_from_cos

    feats, v = _tie_inputs()
    for f, vv in ((feats, v), (torch.randn(2, 2, 4), torch.tensor([[1.0, -1.0], [-2.0, 2.0]]))):
        f, vv = f.to(device), vv.to(device)
        got = NCut(*partition_from_cos(f, _cosines(f), vv, SEED_TIE, SPLIT_TIE))
        _check_partition(got, finish_partition(f, vv))
        if f.shape[0] == 6:
            assert torch.equal(got.score[4].cpu(), torch.zeros(8))
            assert torch.equal(got.score[5].cpu(), torch.zeros(8))


@pytest.mark.parametrize("device", TRITON_KERNEL_DEVICES)
def test_triton_cosine_partition_redoes_a_cancelling_foreground_from_the_features(device):
    """As the CUDA Gram path: a sample whose foreground's unit rows nearly cancel (|mean|^2 < 1e-2) has its
    scores from the features (C's rounding would weigh as 1 / |mean|^2), its neighbour in the batch from C.
    A C that is wrong off the foreground's rows shows which samples read it."""
    from maskedssl.kernels.ncut import partition_from_cos

    g = torch.Generator().manual_seed(0)
    base = torch.randn(32, 96, generator=g)
    pairs = torch.stack([base, -base + 0.01 * torch.randn(32, 96, generator=g)], 1).reshape(64, 96)
    feats = torch.cat([pairs[None], torch.randn(1, 64, 96, generator=g)]).to(device=device,
                                                                            dtype=torch.bfloat16)
    v = torch.ones(2, 64, device=device)  # everything foreground
    want = finish_partition(feats, v)
    cos = _cosines(feats)
    got = NCut(*partition_from_cos(feats, cos, v, SEED_TIE, SPLIT_TIE))
    assert torch.equal(got.foreground, want.foreground)
    torch.testing.assert_close(got.score, want.score, atol=1e-5, rtol=0)
    # C scaled by 2: the cancelling sample does not read it (redone from the features), the other does
    doubled = NCut(*partition_from_cos(feats, 2 * cos, v, SEED_TIE, SPLIT_TIE))
    torch.testing.assert_close(doubled.score[0], want.score[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(doubled.score[1], (want.score[1] * 2 ** 0.5).clamp(-1, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", TRITON_KERNEL_DEVICES)
def test_triton_op_takes_the_partition_from_the_cosines_where_it_should(device, monkeypatch):
    """ncut_bipartition on the triton backend: the partition step from the solver's cosines for 16-bit
    features with N <= D on the tiled path (N > 128) and 2 N <= D on chip, where the solver writes them for
    it (the same vector and cut as from the features, scores within fp32 rounding), from the features
    otherwise (fp32, or N past those bounds)."""
    from maskedssl.kernels import ncut as kernels

    calls = []
    from_cos, from_feats = kernels.partition_from_cos, kernels.partition
    monkeypatch.setattr(kernels, "partition_from_cos", lambda *a: calls.append("cos") or from_cos(*a))
    monkeypatch.setattr(kernels, "partition", lambda *a: calls.append("feats") or from_feats(*a))
    cases = [(1, torch.bfloat16, 150, 160, "cos"), (1, torch.float16, 129, 129, "cos"),
             (1, torch.float32, 150, 160, "feats"), (1, torch.bfloat16, 150, 149, "feats"),
             # on chip: several samples (the solver's write of C per sample), odd N, N = 2
             (3, torch.bfloat16, 37, 80, "cos"), (2, torch.float16, 64, 128, "cos"),
             (2, torch.float16, 2, 4, "cos"), (2, torch.bfloat16, 100, 199, "feats"),
             (2, torch.float32, 37, 80, "feats")]
    for batch, dtype, n, d, path in cases:
        feats = planted(batch, n, d, 0.3, 0.5, dtype, device=device, seed=n)
        calls.clear()
        got = ncut_bipartition(feats, backend="triton")
        assert calls == [path], (dtype, n, d)
        v = kernels.ncut_fiedler(feats, None, 1e-5)[0]
        want = NCut(*from_feats(feats, v, SEED_TIE, SPLIT_TIE))
        assert torch.equal(got.fiedler, want.fiedler) and torch.equal(got.foreground, want.foreground)
        torch.testing.assert_close(got.score, want.score, atol=2e-6, rtol=0)
    feats = planted(2, 130, 136, 0.3, 0.5, torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.maskedssl.ncut_bipartition.default, (feats, None, 1e-5, "triton"))


@pytest.mark.parametrize("device", TRITON_KERNEL_DEVICES)
def test_triton_check_reads_the_cosine_kernels_norms_not_the_features(device, monkeypatch):
    """On the triton backend's tiled path (N > 128) the input check reads the rows' squared norms that the
    cosine kernel writes beside the solver's workspace: the features are read a second time
    (``_checked_features``) only for a norm outside [2^-80, 2^100) (zero, NaN and inf rows included), the
    workspace goes to the solver unless rows were rescaled (one cosine launch, not two), and the result is
    bit for bit the unchecked op's. On chip (N <= 128) the check reads the features."""
    from maskedssl.kernels import ncut as kernels
    from maskedssl.ops import ncut as ncut_module

    reads, launches = [], []
    checked, workspace = ncut_module._checked_features, kernels.workspace
    monkeypatch.setattr(ncut_module, "_checked_features", lambda f: reads.append(1) or checked(f))
    monkeypatch.setattr(kernels, "workspace", lambda *a: launches.append(1) or workspace(*a))

    def run(feats, tau=None, checks=True):
        monkeypatch.setenv("MASKEDSSL_CHECK_INDICES", "1" if checks else "0")
        reads.clear()
        launches.clear()
        return ncut_bipartition(feats, tau, backend="triton"), len(reads), len(launches)

    # the partition from the cosines (16-bit, N <= D), from the features (N > D), and on chip
    for dtype, n, d, tau, work in ((torch.bfloat16, 130, 136, None, 1), (torch.float32, 130, 16, 0.2, 1),
                                   (torch.float16, 20, 16, None, 0)):
        feats = planted(2, n, d, 0.3, 0.5, dtype, device=device, seed=n)
        got, read, launched = run(feats, tau)
        want, _, unchecked_launches = run(feats, tau, checks=False)
        assert (read, launched, unchecked_launches) == (1 - work, work, work), (dtype, n, d)
        assert all(torch.equal(x, y) for x, y in zip(got, want)), (dtype, n, d)
    # a second cosine launch where rows were rescaled
    _check_norm_boundaries(run, planted(2, 130, 136, 0.3, 0.5, device=device), lambda rescaled: 1 + rescaled)


# ----------------------------------------------------------------------------- work per sample
@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_lanczos_products_count_the_solvers_work(backend):
    """The products each solve takes, as the kernels count them: a clear eigengap converges at the first
    convergence test (8 products: a regression in the solver's convergence shows here before any GPU
    timing), featureless noise within a few checks, and a graph with nothing to find (constant or zero
    features, N = 2) at its first step, where the basis breaks down."""
    for n, dtype in ((49, torch.bfloat16), (196, torch.float32)):
        feats = planted(4, n, 64, 0.3, 1.0, dtype=dtype)
        products = lanczos_products(feats, backend=backend)
        assert products.dtype == torch.int32 and products.shape == (4,)
        assert products.tolist() == [CHECK] * 4, (n, products)
    noise = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(0))
    noise = lanczos_products(noise, backend=backend)
    assert ((noise >= 2 * CHECK) & (noise <= STEPS * 2) & (noise % CHECK == 0)).all(), noise
    for degenerate in (torch.ones(2, 30, 8), torch.zeros(2, 30, 8), torch.randn(3, 2, 8)):
        assert lanczos_products(degenerate, backend=backend).tolist() == [1] * degenerate.shape[0]
    # TokenCut's binary graph of two clean clusters has few distinct rows: its basis breaks down early
    feats = planted(2, 49, 32, 0.3, 0.5)
    binary = lanczos_products(feats, 0.2, backend=backend)
    assert ((binary >= 1) & (binary <= CHECK)).all(), binary
    # rows out of fp32 range are rescaled first, so the solve is the same
    scaled = lanczos_products(feats * 2.0 ** 80, backend=backend)
    assert torch.equal(scaled, lanczos_products(feats, backend=backend))


@pytest.mark.skipif(len(cpu_kernel_backends()) < 2, reason="needs both kernel backends on CPU")
def test_lanczos_products_agree_between_backends():
    # the two kernels run one algorithm with the same constants and start vector
    g = torch.Generator().manual_seed(1)
    for feats in (planted(3, 100, 48, 0.2, 2.0, seed=1), torch.randn(3, 40, 16, generator=g)):
        counts = [lanczos_products(feats, backend=b) for b in cpu_kernel_backends()]
        assert torch.equal(counts[0], counts[1]), counts


def test_lanczos_products_validation():
    feats = planted(2, 8, 16, 0.3, 0.5)
    with pytest.raises(ValueError, match="triton or cuda backend"):
        lanczos_products(feats, backend="torch")
    with pytest.raises(ValueError, match="triton or cuda backend"):
        lanczos_products(feats.double(), backend="triton")  # float64 always runs the reference
    with pytest.raises(ValueError, match="N >= 2"):
        lanczos_products(feats[:, :1], backend="triton")
    with pytest.raises(ValueError, match="finite"):
        lanczos_products(torch.full((1, 4, 3), float("nan")), backend="triton")
    with pytest.raises(TypeError, match="feats"):
        lanczos_products(feats.int(), backend="triton")
    for backend in cpu_kernel_backends():
        empty = lanczos_products(feats[:0], backend=backend)
        assert empty.shape == (0,) and empty.dtype == torch.int32


def test_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def informed(feats):
        out = ncut_bipartition(feats, 0.2)
        return out.score.masked_fill(~out.foreground, -1.0).argsort(dim=1, descending=True)

    feats = planted(2, 16, 24, 0.3, 0.5)
    out = ncut_bipartition(feats, 0.2)
    expected = out.score.masked_fill(~out.foreground, -1.0).argsort(dim=1, descending=True)
    assert torch.equal(informed(feats), expected)


# ----------------------------------------------------------------------------- GPU
GPU_CASES = [  # (batch, n, d)
    (1, 2, 16), (3, 3, 32), (8, 16, 64), (16, 49, 100), (64, 64, 384), (256, 196, 768), (32, 256, 384),
    (16, 576, 384), (4, 1024, 192),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_kernel_backends() or ["triton", "cuda"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"b{c[0]}-n{c[1]}-d{c[2]}")
@pytest.mark.parametrize("tau", [None, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_planted_clusters_gpu(backend, case, tau, dtype):
    batch, n, d = case
    for frac, noise in [(0.3, 0.5), (0.1, 1.0)]:
        feats = planted(batch, n, d, frac, noise, dtype, device="cuda")
        check_against_reference(feats, tau, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_kernel_backends() or ["triton", "cuda"])
@pytest.mark.parametrize("tau", [None, 0.2])
def test_degenerate_and_strided_gpu(backend, tau):
    for n in (2, 8, 196, 1024):
        same = torch.randn(1, 1, 64, device="cuda").expand(2, n, 64)
        zeros = torch.zeros(2, n, 64, device="cuda")
        for feats in (same, zeros):
            first = ncut_bipartition(feats, tau, backend=backend)
            again = ncut_bipartition(feats, tau, backend=backend)
            for a, b in zip(first, again):
                assert torch.equal(a, b)
            assert torch.isfinite(first.fiedler).all() and first.foreground.any(1).all()
        strided = planted(4, n, 96, 0.3, 0.5, device="cuda").transpose(1, 2).contiguous().transpose(1, 2)
        check_against_reference(strided, tau, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_kernel_backends() or ["triton", "cuda"])
def test_opcheck_gpu(backend):
    feats = planted(2, 49, 64, 0.3, 0.5, device="cuda")
    torch.library.opcheck(torch.ops.maskedssl.ncut_bipartition.default, (feats, None, 1e-5, backend))
    if backend == "cuda":
        torch.library.opcheck(torch.ops.maskedssl.ncut_fiedler_cuda.default, (feats, 0.2, 1e-5))
        torch.library.opcheck(torch.ops.maskedssl.ncut_fiedler_cuda.default, (feats, None, 1e-5, True))


@pytest.mark.gpu
def test_backends_agree_gpu():
    backends = gpu_kernel_backends()
    if len(backends) < 2:
        pytest.skip("needs both kernel backends")
    feats = planted(64, 196, 384, 0.3, 1.0, torch.bfloat16, device="cuda")
    outs = [ncut_bipartition(feats, backend=b) for b in backends]
    cos = (outs[0].fiedler * outs[1].fiedler).sum(1).abs()
    assert (cos >= 0.999).all()



@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_kernel_backends() or ["triton", "cuda"])
def test_two_equal_halves_gpu(backend):
    # the start vector of both kernels must not be orthogonal to the Fiedler vector of equal halves
    for n in (48, 64, 196):
        opposite = torch.cat([torch.ones(2, n // 2, 4), -torch.ones(2, n // 2, 4)], dim=1).cuda()
        foreground = ncut_bipartition(opposite, backend=backend).foreground
        assert (foreground[:, : n // 2].all(1) | foreground[:, n // 2:].all(1)).all()
        assert (foreground.sum(1) == n // 2).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_kernel_backends() or ["triton", "cuda"])
def test_fp32_features_keep_their_accuracy_under_tf32_gpu(backend, monkeypatch):
    # a training script's TF32 setting must not reach the kernels' affinity (cuBLAS would keep ~1e-3)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    for n in (49, 196, 576):
        check_against_reference(planted(8, n, 384, 0.3, 0.5, device="cuda"), None, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_kernel_backends() or ["triton", "cuda"])
def test_huge_and_tiny_features_gpu(backend):
    base = planted(4, 196, 64, 0.3, 0.5, device="cuda")
    ref = ncut_bipartition(base, backend=backend)
    for scale in (2.0 ** 60, 2.0 ** -70):
        out = ncut_bipartition(base * scale, backend=backend)
        assert torch.equal(out.foreground, ref.foreground)
        torch.testing.assert_close(out.fiedler, ref.fiedler, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.gpu), "cpu"])
def test_cuda_backend_hands_large_n_to_the_next_backend(device, monkeypatch):
    # on the CPU: the emulated kernels, and the torch backend takes over (Triton's interpreter is slow here)
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    if "cuda" not in available_backends(device):
        pytest.skip("needs the CUDA kernels (a GPU, or the emulator on CPU)")
    feats = planted(2, 1100, 64, 0.3, 0.5, device=device)
    check_against_reference(feats, None, "cuda")
