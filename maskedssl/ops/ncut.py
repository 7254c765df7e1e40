"""``ncut_bipartition``: per-sample normalized-cut bi-partition of patch features (TokenCut), for
Self-guided MAE's informed masks.

Affinity A = cos(f_i, f_j) clamped below at eps (or TokenCut's binary graph with ``tau``: 1 where
cos > tau, eps elsewhere); degrees d = A 1. The Fiedler vector is the second-largest eigenvector u of
D^-1/2 A D^-1/2 mapped back, v = D^-1/2 u (= the second-smallest generalized eigenvector of
(D - A) v = lambda D v). Split at mean(v); the foreground is the side holding argmax |v| (TokenCut's seed;
entries within ``SEED_TIE`` of the largest count as tied and the lowest index wins, so that an exact tie,
as at N = 2, is not decided by each backend's rounding). Entries at most ``SPLIT_TIE`` max |v| above the
mean count as at the mean, on the background side, for the same reason: a graph with a symmetry (a binary
graph where one pair of patches is cut: v = e_i - e_j) puts entries exactly at the mean. Where the Fiedler
vector is not unique (identical or zero features, a constant affinity), every backend returns the
projection of one fixed start vector (``lanczos_start``) onto its eigenspace, so the cut is the same
everywhere and for identical samples.

Output convention: ``fiedler`` is v scaled to unit norm and signed so that the foreground is the side
above the mean (``foreground == fiedler > fiedler.mean() + SPLIT_TIE * fiedler.abs().max()``, or
everything when no entry is); ``score`` is each patch's cosine to the mean normalised feature of the
foreground.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from ._backend import cuda_extension_loaded, refuse_cuda, resolve_backend
from ._validate import REFERENCE_DTYPES, check_tensor, index_checks_enabled

AUTO_ORDER = ("cuda", "triton", "torch")
# csrc/ncut.cu holds a vector in one 256-thread block, 4 entries per thread; larger N runs on the next backend
CUDA_MAX_N = 1024
# csrc/ncut.cu's partition kernel keeps 9 D + 2 N floats in shared memory; wider features take the torch rules
CUDA_PARTITION_MAX_D = 2048
# Rows of features whose largest |entry| is at or above 2^PEAK_EXP, or below 2^-PEAK_EXP, are scaled by a
# power of two (exact, cosines unchanged) so that the kernels' fp32 squared norms neither overflow
# (D * 2^100 < 2^128 for any D < 2^28) nor underflow (a row of entries below ~1e-19 would read as zero).
PEAK_EXP = 50
# The kernels take the affinity floor in fp32 and no lower than this. A zero feature row has degree N eps,
# and v = D^-1/2 u would divide the solver's error in its entry of u (its tolerance is ~1e-6) by
# sqrt(N eps); so the kernels take a zero row's entry from its row of A v = theta D v instead: sum(v) /
# (N theta), which does not depend on eps (``_zero_rows`` in kernels/ncut.py; not where theta is within
# the solver's tolerance of 0, or N theta of the number of zero rows). Every other row has degree >= 1
# (its own affinity is 1), which a smaller eps changes by less than the solver's tolerance: so any eps
# below this gives the kernels' result at this one. With one zero row in planted clusters (200 samples,
# N = 30, D = 16, tau None and 0.2), the kernels' partition equals the float64 reference's in every sample
# at eps = 1e-5 and 1e-10 (with v_z = u_z / sqrt(N eps): 1 to 26 samples differed, nearly all in that row).
KERNEL_MIN_EPS = 1e-10
# Entries of |v| within this fraction of max |v| count as tied for the seed (the lowest index wins): exact
# ties (N = 2, two equal clusters of a binary graph) must not be decided by each backend's rounding.
SEED_TIE = 1e-4
# Entries of v within this fraction of max |v| above the mean count as at the mean (not foreground): an
# entry exactly at the mean in exact arithmetic comes out of the fp32 kernels a few 1e-8 max |v| to either
# side of it, and out of the float64 reference ~1e-16 to either side, so without a margin each backend's
# rounding decided it (on a binary graph where one pair of patches is cut, all N - 2 others: 4 of 12
# patches differed between backends). Small, so that the margin almost never moves an entry that is not
# an exact tie: of 249,600 entries of Fiedler vectors (Gaussian and planted-cluster features, N 16-196,
# D 8-384, tau None and 0.2), 2,318 were within 1e-9 max |v| of their mean (ties) and 16 more within this.
# It also stays well below the default eps: a row of zeros in a nearly disconnected graph sits above the
# mean by a margin of the order of eps max |v| (9.96e-6 max |v| in one sample at eps = 1e-5), so a margin
# near eps would meet those rows often. At an exact tie a zero row carries more rounding than the other
# rows (the kernels take its entry from their sum divided by N theta - k, see KERNEL_MIN_EPS): 3e-6 to
# 6e-6 max |v| on the cut-pair graph with a zero row at N = 40 and 150, where that rounding decides its side.
SPLIT_TIE = 1e-6
# Eigenvalues of the deflated matrix within this of its top one span the top eigenspace the reference
# projects the kernels' start vector onto (a graph whose Fiedler vector is not unique: identical or zero
# features, a constant affinity), as Lanczos started from that vector converges to that projection.
EIGEN_TIE = 1e-6


class NCut(NamedTuple):
    fiedler: torch.Tensor  # (B, N) float32, unit norm, foreground above its mean
    foreground: torch.Tensor  # (B, N) bool
    score: torch.Tensor  # (B, N) float32, cosine to the foreground mean feature


def affinity(feats: torch.Tensor, tau: float | None, eps: float) -> torch.Tensor:
    """(B, N, N) affinity of L2-normalised features, in feats' dtype."""
    f = torch.nn.functional.normalize(feats, dim=-1)
    cos = f @ f.transpose(1, 2)
    if tau is None:
        return cos.clamp_min(eps)
    return torch.where(cos > tau, 1.0, eps).to(cos.dtype)


def split_partition(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From a (B, N) generalized eigenvector ``v`` (any sign/scale): the signed unit ``fiedler`` vector and
    the ``foreground``. The reference rules; the kernels' partition step applies the same ones."""
    v = v.float()
    magnitude = v.abs()
    # the first index within SEED_TIE of the largest |v| (argmax returns the first of exact ties)
    near_top = magnitude >= magnitude.amax(dim=1, keepdim=True) * (1 - SEED_TIE)
    seed = near_top.to(torch.uint8).argmax(dim=1, keepdim=True)
    above = v > v.mean(dim=1, keepdim=True)
    seed_above = above.gather(1, seed)
    # flip so the seed's side is the one above the mean
    sign = torch.where(seed_above, 1.0, -1.0)
    fiedler = torch.nn.functional.normalize(v * sign, dim=1)
    cut = fiedler.mean(dim=1, keepdim=True) + SPLIT_TIE * fiedler.abs().amax(dim=1, keepdim=True)
    foreground = fiedler > cut
    # a constant v leaves no side above the mean: then everything is foreground
    empty = ~foreground.any(dim=1, keepdim=True)
    return fiedler, foreground | empty


def foreground_scores(feats: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """(B, N) float32: each patch's cosine to the mean normalised feature of its sample's foreground (the
    reference: a float32 copy of the features normalised, masked and summed)."""
    # float64 features are normalised before the cast, which could overflow
    f = feats if feats.dtype == torch.float64 else feats.float()
    f = torch.nn.functional.normalize(f, dim=-1).float()
    fg_mean = (f * foreground.unsqueeze(-1)).sum(1) / foreground.sum(1, keepdim=True)
    score = torch.einsum("bnd,bd->bn", f, torch.nn.functional.normalize(fg_mean, dim=-1))
    return score.clamp_(-1.0, 1.0)  # a cosine, also after rounding


def finish_partition(feats: torch.Tensor, v: torch.Tensor, backend: str = "torch") -> NCut:
    """From a (B, N) generalized eigenvector ``v`` (any sign/scale): sign, split, foreground, score.

    ``torch`` runs the reference (``split_partition``: some twenty small ops; ``foreground_scores``: about
    1.3 GB of float32 traffic at B = 256, N = 196, D = 768). The kernel backends apply the same rules in
    one launch (one program or block per sample) that reads the features twice in their own dtype; only
    the float32 summation order differs. Features wider than the kernels take (Triton's PARTITION_MAX_D,
    8192; CUDA_PARTITION_MAX_D, 2048) use the reference. (``ncut_bipartition`` on the cuda backend does
    not come here: ``ncut_bipartition_cuda`` runs solver and partition in one C++ call, and for 16-bit
    features with N <= D takes the scores from the solver's Gram matrix, N^2 / 2 floats for a balanced
    cut where the features are 2 N D elements: about 20 MB (half of G) instead of 154 MB at that shape in
    bf16. A sample whose foreground's unit features nearly cancel, where G's rounding would show, is
    redone from the features in a second launch. The triton backend's op does the same from its solver's
    cosine matrix for 16-bit features with N <= D past the on-chip path, and 2 N <= D on it:
    ``maskedssl.kernels.ncut.bipartition``.)
    """
    d = feats.shape[-1]
    if backend == "triton":
        from maskedssl.kernels import ncut as kernels

        if d <= kernels.PARTITION_MAX_D:
            return NCut(*kernels.partition(feats, v, SEED_TIE, SPLIT_TIE))
    if backend == "cuda" and d <= CUDA_PARTITION_MAX_D:
        return NCut(*torch.ops.maskedssl.ncut_partition_cuda(feats, v, SEED_TIE, SPLIT_TIE))
    fiedler, foreground = split_partition(v)
    return NCut(fiedler, foreground, foreground_scores(feats, foreground))


def lanczos_start(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The kernels' fixed start vector, (-1)^i (1 + h(i)) with h the lowbias32 hash scaled to [0, 1)."""
    h = torch.arange(n, dtype=torch.int64, device=device)
    mask = 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & mask
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & mask
    h = h ^ (h >> 16)
    sign = 1.0 - 2.0 * (torch.arange(n, device=device) % 2)
    return (sign * (1.0 + (h >> 8).to(torch.float64) / 16777216.0)).to(dtype)


def _ncut_torch(feats, tau, eps):
    a = affinity(feats.double(), tau, eps)
    degree = a.sum(-1)
    d_isqrt = degree.rsqrt()
    m = d_isqrt.unsqueeze(-1) * a * d_isqrt.unsqueeze(-2)
    # M's top eigenvector is known, u1 = D^1/2 1 (eigenvalue 1): moved to eigenvalue -1, the top of what is
    # left is the Fiedler vector, as the kernels deflate it. Taking eigh's second vector of M instead is
    # the same where the graph is connected, but where it falls apart (eps -> 0 between clusters) 1 is a
    # double eigenvalue and eigh returns any mix of the two vectors.
    # sqrt(d) / |sqrt(d)| written out: normalize's 1e-12 floor left a zero sample's tiny sqrt(N eps 1)
    # unscaled
    u1 = degree.sqrt() / degree.sum(-1, keepdim=True).sqrt()
    m = m - 2.0 * u1.unsqueeze(-1) * u1.unsqueeze(-2)
    vals, vecs = torch.linalg.eigh(m)  # ascending
    # the start vector's part in the top eigenspace: eigh's top vector where that space is a line (up to
    # sign), and where it is not (the Fiedler vector is not unique), the one vector the kernels converge to
    top = (vals >= vals[..., -1:] - EIGEN_TIE).to(vecs.dtype)
    x0 = lanczos_start(m.shape[-1], vecs.dtype, vecs.device)
    u = vecs @ (top * (x0 @ vecs)).unsqueeze(-1)
    u = u.squeeze(-1)
    # x0 without a part there (it has none of u1, which is deflated, and no exact ties in its entries)
    lost = u.norm(dim=-1, keepdim=True) <= 1e-9 * x0.norm()
    u = torch.where(lost, vecs[..., -1], u)
    v = u * d_isqrt
    # unit norm before finish_partition's fp32 cast: a tiny eps makes D^-1/2 too large for fp32
    return finish_partition(feats, torch.nn.functional.normalize(v, dim=1))


def _fiedler_kernel(feats, tau, eps, backend, count_products=False):
    """The generalized Fiedler vector (B, N) float32 from the ``triton`` or ``cuda`` kernels, and the
    products each sample's solve took (int32 (B,) when ``count_products``, else empty)."""
    eps = max(eps, KERNEL_MIN_EPS)
    if backend == "triton":
        from maskedssl.kernels.ncut import ncut_fiedler

        return ncut_fiedler(feats, tau, eps, count_products)
    return torch.ops.maskedssl.ncut_fiedler_cuda(feats, tau, eps, count_products)


@torch.library.custom_op("maskedssl::ncut_bipartition", mutates_args=())
def _ncut_op(feats: torch.Tensor, tau: float | None, eps: float, backend: str,
             gram: torch.Tensor | None = None, degrees: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gram`` and ``degrees``: what the input check computed for the solver, else None. The cuda backend:
    G = F F^T (B, N, N) from ``ncut_gram_cuda`` (no degrees). The triton backend's tiled path: the cosines C
    (B, N, N), the Gram matrix of the unit rows, and the degrees of the affinity (B, N) for this tau and
    eps, from ``maskedssl.kernels.ncut.workspace``. The torch backend takes neither."""
    if backend == "torch":
        return tuple(_ncut_torch(feats, tau, eps))
    if backend == "cuda" and feats.shape[-1] <= CUDA_PARTITION_MAX_D:
        # solver and partition step in one C++ call (16-bit features with N <= D: the partition from the
        # solver's Gram matrix, fewer bytes than the features)
        return torch.ops.maskedssl.ncut_bipartition_cuda(feats, gram, tau, max(eps, KERNEL_MIN_EPS), SEED_TIE,
                                                        SPLIT_TIE)
    if backend == "triton":
        from maskedssl.kernels import ncut as kernels

        work = None if gram is None else (gram, degrees)
        eps = max(eps, KERNEL_MIN_EPS)
        if feats.shape[-1] <= kernels.PARTITION_MAX_D:
            # solver and partition step; the partition from the solver's cosines where that reads
            # fewer bytes than the features (kernels.partition_from_cosines)
            return kernels.bipartition(feats, tau, eps, SEED_TIE, SPLIT_TIE, work)
        return tuple(finish_partition(feats, kernels.ncut_fiedler(feats, tau, eps, work=work)[0]))
    return tuple(finish_partition(feats, _fiedler_kernel(feats, tau, eps, backend)[0], backend))


@_ncut_op.register_fake
def _(feats, tau, eps, backend, gram=None, degrees=None):
    b, n, _ = feats.shape
    return (feats.new_empty(b, n, dtype=torch.float32), feats.new_empty(b, n, dtype=torch.bool),
            feats.new_empty(b, n, dtype=torch.float32))


if cuda_extension_loaded():
    @torch.library.register_fake("maskedssl::ncut_fiedler_cuda")
    def _(feats, tau, eps, count_products=False):
        b, n = feats.shape[:2]
        return (feats.new_empty(b, n, dtype=torch.float32),
                feats.new_empty(b if count_products else 0, dtype=torch.int32))

    def _partition_fake(feats, *_):
        b, n = feats.shape[:2]
        return (feats.new_empty(b, n, dtype=torch.float32), feats.new_empty(b, n, dtype=torch.bool),
                feats.new_empty(b, n, dtype=torch.float32))

    for _name in ("ncut_partition_cuda", "ncut_partition_gram_cuda", "ncut_bipartition_cuda"):
        torch.library.register_fake(f"maskedssl::{_name}")(_partition_fake)

    @torch.library.register_fake("maskedssl::ncut_gram_cuda")
    def _(feats):
        b, n = feats.shape[:2]
        return feats.new_empty(b, n, n, dtype=torch.float32)


def _scale_rows(feats: torch.Tensor, row_peak: torch.Tensor) -> torch.Tensor:
    """Each row whose largest |entry| is outside [2^-PEAK_EXP, 2^PEAK_EXP) (zero rows aside) times the power
    of two that brings it into [0.5, 1) (exact); the other rows as they are. Scaling those too would change
    their result whenever another row of the batch is out of range: a row of norm below F.normalize's
    1e-12 floor reads as almost zero unscaled, as a full direction scaled. The factor is applied in float64
    as two halves, so that even float64 subnormals stay in range."""
    peak = row_peak.double()
    out_of_range = (peak >= 2.0 ** PEAK_EXP) | (peak < 2.0 ** -PEAK_EXP)  # zero rows: exponent 0, no shift
    shift = torch.where(out_of_range, -torch.frexp(peak).exponent.double(), 0.0).unsqueeze(-1)
    half = torch.trunc(shift / 2)
    return (feats.double() * torch.exp2(half) * torch.exp2(shift - half)).to(feats.dtype)


def check_graph_args(tau, eps) -> None:
    """tau None or in (-1, 1), eps in (0, 1] (shared with ``InformedMasking``, which checks them early)."""
    if tau is not None:
        if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
            raise TypeError(f"tau must be a float or None, got {type(tau).__name__}")
        if not -1.0 < tau < 1.0:
            raise ValueError(f"tau must be in (-1, 1), got {tau}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must be in (0, 1], got {eps}")


def _checked_features(feats: torch.Tensor) -> torch.Tensor:
    """The input check from the features: finite (else ``ValueError``), rows out of fp32 range rescaled."""
    # max |entry| per row in one pass over the features (abs().amax() would write and read a copy); NaN
    # and inf propagate, so one sync answers every check
    row_peak = torch.linalg.vector_norm(feats, float("inf"), dim=-1)
    high, low = torch.stack([row_peak.max(), row_peak.masked_fill(row_peak == 0, 1.0).min()]).tolist()
    if not math.isfinite(high):
        raise ValueError("feats must be finite: found NaN or inf")
    if high >= 2.0 ** PEAK_EXP or low < 2.0 ** -PEAK_EXP:
        feats = _scale_rows(feats, row_peak)
    return feats


def _norms_in_range(sq_norms: torch.Tensor) -> bool:
    """The kernel backends' input check from the rows' squared norms their first launch computes anyway
    (cuda: the diagonal of G = F F^T from ``ncut_gram_cuda``; triton's tiled path: ``workspace``'s norms,
    summed in fp32 like G's): whether every one lies in [2^-80, 2^100). If not, ``_checked_features``
    decides (NaN, inf and zero rows land there).

    In that range the rows are finite and need no scaling (max |entry| <= norm < 2^PEAK_EXP; norm >= 2^-40
    keeps every entry the fp32 sums lose, below 2^-126 each, under D 2^-46 of the row's squared norm;
    ``_checked_features`` would scale a row only for D > 2^20, by a power of two), and the features are
    not read a second time: 77 MB less than ``_checked_features`` at B = 256, N = 196, D = 768 in bf16,
    for 0.2 MB of norms. One sync, as before."""
    low, high = torch.stack(torch.aminmax(sq_norms)).tolist()
    return 2.0 ** -80 <= low and high < 2.0 ** 100


def _prepare(feats: torch.Tensor, tau, eps, backend: str | None, op: str, want_work: bool = False
             ) -> tuple[torch.Tensor, str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Checks ``ncut_bipartition``'s arguments; returns the features as the kernels take them (rows out of
    fp32 range rescaled), the resolved backend and, when ``want_work``, the op's (``gram``, ``degrees``)
    arguments: what the check computed that the solver then uses (the cuda one-call op's G; the triton
    tiled path's cosines and degrees), or (None, None)."""
    check_tensor("feats", feats, ndim=3, dtypes=REFERENCE_DTYPES, what="(B, N, D)")
    b, n, d = feats.shape
    if n < 2 or d < 1:
        raise ValueError(f"feats must have N >= 2 patches and D >= 1, got {tuple(feats.shape)}")
    check_graph_args(tau, eps)
    name = resolve_backend(op, backend, feats.device, AUTO_ORDER, feats.dtype)
    name = refuse_cuda(op, name, feats.device,
                       f"N = {n} patches exceed the CUDA kernel's {CUDA_MAX_N}" if n > CUDA_MAX_N else None,
                       AUTO_ORDER)
    feats = feats.detach()
    work, norms = (None, None), None
    if b > 0 and index_checks_enabled() and feats.device.type != "meta":
        if want_work and name == "cuda" and d <= CUDA_PARTITION_MAX_D:
            gram = torch.ops.maskedssl.ncut_gram_cuda(feats)
            work, norms = (gram, None), gram.diagonal(dim1=1, dim2=2)
        elif want_work and name == "triton":
            from maskedssl.kernels import ncut as kernels

            if kernels.tiled(n, d):
                tau_k = None if tau is None else float(tau)
                cos, degrees, norms = kernels.workspace(feats, tau_k, max(float(eps), KERNEL_MIN_EPS))
                work = (cos, degrees)
        if norms is None or not _norms_in_range(norms):
            checked = _checked_features(feats)
            work = work if checked is feats else (None, None)  # rescaled rows need a new workspace
            feats = checked
    return feats, name, work


def ncut_bipartition(feats: torch.Tensor, tau: float | None = None, eps: float = 1e-5, *,
                     backend: str | None = None) -> NCut:
    """Normalized-cut bi-partition of each sample's N patch features (B, N, D) -> ``NCut``.

    feats: float32/bfloat16/float16 (float64 runs the torch backend), finite, N >= 2 (B = 0 gives empty
    results); tau: TokenCut's binary-graph threshold in (-1, 1) or None for the clamped cosine graph;
    eps in (0, 1]: the affinity floor (the kernels take at least ``KERNEL_MIN_EPS`` = 1e-10, which gives
    the result of any smaller eps to the solver's tolerance: see the comment there). No gradient flows
    through the result. The finiteness check costs one reduction and one device->host sync, like the ops'
    index checks (``MASKEDSSL_CHECK_INDICES=0`` skips it, and so does ``torch.compile``); the same
    reduction finds rows whose entries are all below 2^-50 or any above 2^50; each such row is scaled by a
    power of two first (without the check, their fp32 norms underflow or overflow). On the cuda backend,
    and on the triton backend for N > 128 (its tiled path), the reduction runs over the rows' squared norms
    from the kernels' first launch (the diagonal of the Gram matrix the cuda solver then uses; the norms
    the triton cosine kernel writes beside the cosines), and over the features only where a norm is out of
    range.
    """
    feats, name, (gram, degrees) = _prepare(feats, tau, eps, backend, "ncut_bipartition", want_work=True)
    if feats.shape[0] == 0:
        empty = feats.new_empty(0, feats.shape[1], dtype=torch.float32)
        return NCut(empty, empty.bool(), empty.clone())
    fiedler, foreground, score = torch.ops.maskedssl.ncut_bipartition(
        feats, None if tau is None else float(tau), float(eps), name, gram, degrees)
    return NCut(fiedler, foreground, score)


def lanczos_products(feats: torch.Tensor, tau: float | None = None, eps: float = 1e-5, *,
                     backend: str | None = None) -> torch.Tensor:
    """How many matrix-vector products the kernels' eigensolver takes for each sample -> int32 (B,).

    A diagnostic of the work behind ``ncut_bipartition`` (same arguments, checks and kernel run, so the
    same Fiedler vectors), for the benchmarks (time per product) and the convergence tests: at most
    ``STEPS * MAX_CYCLES`` = 512, a multiple of ``CHECK`` = 8 unless a basis breaks down early. Needs a
    kernel backend (``triton`` or ``cuda``; ``auto`` as ``ncut_bipartition`` picks it): the ``torch``
    reference solves with a dense ``eigh``, which takes no products, and raises ``ValueError``.
    """
    feats, name, _ = _prepare(feats, tau, eps, backend, "ncut_bipartition")
    if name == "torch":
        raise ValueError(f"lanczos_products needs the triton or cuda backend; {feats.dtype} features on "
                         f"{feats.device} resolve to the torch reference, which has no products to count")
    if feats.shape[0] == 0:
        return feats.new_empty(0, dtype=torch.int32)
    tau = None if tau is None else float(tau)
    return _fiedler_kernel(feats, tau, float(eps), name, count_products=True)[1]
