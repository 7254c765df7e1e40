"""Normalized-cut bi-partition (Self-guided MAE's informed masks): the whole ``ncut_bipartition`` per batch.

    python -m benchmarks.bench_ncut [--quick]

Impls, same inputs (bf16 features of two planted clusters, 30% / 70% of the patches, noise 1.0):
- ``reference``: batched ``torch.linalg.eigh`` in fp32 on the GPU on the same normalised affinity, with the
  seed rule and scores (``benchmarks.reference.ncut_eigh``). On CUDA it loops over the matrices for N > 32,
  so for B > 64 it is timed on 64 samples and scaled by B / 64 (``extra.scaled_from_B``), except at the
  headline shape, which is timed whole.
- ``tokencut_cpu``: TokenCut's per-image path: affinity on the GPU, copied to the host, then
  ``scipy.linalg.eigh(D - A, D, subset_by_index=[1, 2])``; timed on a few images, reported per image x B.
- ``triton`` and ``cuda``: ``maskedssl.ops.ncut_bipartition`` with that backend (argument validation, the
  kernels and the partition step included; the finiteness/scale check of the features, a
  reduction and one device->host sync, is off as ``MASKEDSSL_CHECK_INDICES=0`` leaves it, and timed with
  the op at the headline shape as ``<backend>+check``: both read the rows' squared norms from the kernels'
  first launch, the diagonal of the Gram matrix the CUDA solver then uses and the norms Triton's cosine
  kernel writes beside its workspace; Triton's on-chip path, N <= 128, reads the features once more).
  Before timing, each backend's foreground on the
  samples the reference timed must agree with the fp32 ``torch.linalg.eigh``'s on >= 99% of their patches
  (a sanity gate on the timed inputs, whose planted clusters have a clear eigengap; the tests hold every
  sample to the float64 reference), or the benchmark raises; rows record the mean and the worst sample.
  Rows also record the eigensolver's work on the timed batch (``maskedssl.ops.ncut.lanczos_products``:
  matrix-vector products per sample, mean and max, counted by the kernels themselves), which tells a slow
  row's solver from its memory traffic.
- ``ncut_partition`` rows (headline shape): the step after the eigensolver on its own, the reference's
  torch ops against each kernel backend's single launch (``measure_partition``), ``cuda_gram``, the
  same step from the solver's Gram matrix, which the op's cuda path takes for 16-bit features with N <= D,
  and ``triton_cos``, the same from the cosine matrix, which the op's triton path takes for 16-bit features
  with N <= D (2 N <= D for N <= 128).

Floor: bytes = features read once (B N D e) + outputs written once (B N (4 + 1 + 4)); FLOPs = the affinity
2 B N^2 D plus one Lanczos cycle of products, 2 B N^2 * 32 (more cycles only when an eigengap is unclear).
Headline (B = 256, N = 196, D = 768, bf16): ~77 MB and ~15 GFLOP.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import bench_main, index_checks, make_row, time_ms
from benchmarks.reference import ncut_eigh
from maskedssl.kernels.ncut import STEPS, partition_from_cos, partition_from_cosines
from maskedssl.ops import available_backends, ncut_bipartition
from maskedssl.ops.ncut import SEED_TIE, SPLIT_TIE, NCut, finish_partition, lanczos_products

DTYPE = torch.bfloat16
DEVICE = "cuda"
TAU, EPS = None, 1e-5
HEADLINE = (256, 196, 768)
SWEEP = [(b, n, d) for b in (64, 256, 1024) for n in (64, 196, 256, 576) for d in (384, 768)]
EIGH_MAX_B = 64
MIN_AGREEMENT = 0.99  # of all patches of the samples compared
TOKENCUT_IMAGES = 4


def planted_features(b: int, n: int, d: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    centers = torch.randn(b, 2, d, device=DEVICE, generator=g)
    labels = (torch.rand(b, n, device=DEVICE, generator=g) < 0.3).long()
    feats = centers.gather(1, labels.unsqueeze(-1).expand(-1, -1, d))
    return (feats + torch.randn(b, n, d, device=DEVICE, generator=g)).to(DTYPE)


def tokencut_cpu_ms_per_image(feats: torch.Tensor) -> float:
    """TokenCut's bi-partition of one image at a time with scipy's generalized eigensolver."""
    import numpy as np
    import scipy.linalg

    times = []
    for f in feats[:TOKENCUT_IMAGES]:
        start = time.perf_counter()
        fn = torch.nn.functional.normalize(f.float(), dim=-1)
        cos = fn @ fn.T
        a = (cos.clamp_min(EPS) if TAU is None else torch.where(cos > TAU, 1.0, EPS)).cpu().numpy()
        deg = np.diag(a.sum(1))
        _, vecs = scipy.linalg.eigh(deg - a, deg, subset_by_index=[1, 2])
        v = vecs[:, 0]
        seed = np.argmax(np.abs(v))
        above = v > v.mean()
        foreground = above if above[seed] else ~above
        fg_mean = (fn.cpu().numpy() * foreground[:, None]).sum(0)
        _ = fn.cpu().numpy() @ (fg_mean / max(np.linalg.norm(fg_mean), 1e-12))
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def measure_case(b: int, n: int, d: int, peaks: dict, quick: bool) -> list[dict]:
    warmup, rep = (10, 30) if quick else (25, 100)
    feats = planted_features(b, n, d)
    case = {"B": b, "N": n, "D": d, "dtype": "bf16"}
    bytes_moved = b * n * d * feats.element_size() + b * n * (4 + 1 + 4)
    flops = 2 * b * n * n * d + 2 * b * n * n * STEPS
    rows = []

    whole = (b, n, d) == HEADLINE or b <= EIGH_MAX_B
    sub = feats if whole else feats[:EIGH_MAX_B]
    start = time.perf_counter()
    want_foreground, _ = ncut_eigh(sub, TAU, EPS)  # also the warm-up
    if sub.is_cuda:
        torch.cuda.synchronize()
    once_ms = (time.perf_counter() - start) * 1e3
    # do_bench's rep is in ms: about three timed runs of this slow reference, the median of them
    ms = time_ms(lambda: ncut_eigh(sub, TAU, EPS), warmup=1, rep=max(1, int(3 * once_ms)))
    ms *= b / sub.shape[0]
    row = make_row("ncut_bipartition", case, "reference", ms, bytes_moved, flops, peaks)
    if not whole:
        row["extra"] = {"scaled_from_B": EIGH_MAX_B}
    rows.append(row)

    per_image = tokencut_cpu_ms_per_image(feats)
    row = make_row("ncut_bipartition", case, "tokencut_cpu", per_image * b, bytes_moved, flops, peaks)
    row["extra"] = {"ms_per_image": round(per_image, 3), "images_timed": TOKENCUT_IMAGES}
    rows.append(row)

    for backend in ("triton", "cuda"):
        if backend not in available_backends(DEVICE):
            continue
        # the same foreground as the fp32 eigh on the eigh's samples, on at least MIN_AGREEMENT of all their
        # patches (the planted clusters have a clear eigengap); a wrong partition gets no timing. The worst
        # sample's agreement is recorded too (a whole sample can flip sides where the eigh's plain argmax
        # seed and the op's tie rule disagree).
        same = (ncut_bipartition(sub, TAU, EPS, backend=backend).foreground == want_foreground).float()
        agreement, worst = same.mean().item(), same.mean(1).min().item()
        if agreement < MIN_AGREEMENT:
            raise AssertionError(f"{backend}: foreground agrees with torch.linalg.eigh on only "
                                 f"{agreement:.2%} of the patches at {case}")
        products = lanczos_products(feats, TAU, EPS, backend=backend).float()
        # the op with its input check (one reduction and one device->host sync) is a row of its own
        for check in (False, True) if (b, n, d) == HEADLINE else (False,):
            with index_checks(check):
                ms = time_ms(lambda: ncut_bipartition(feats, TAU, EPS, backend=backend), warmup, rep)
            impl = f"{backend}+check" if check else backend
            row = make_row("ncut_bipartition", case, impl, ms, bytes_moved, flops, peaks)
            row["extra"] = {"agreement_vs_eigh": agreement, "worst_sample_agreement": worst,
                            "agreement_samples": sub.shape[0],
                            "lanczos_products_mean": round(products.mean().item(), 2),
                            "lanczos_products_max": int(products.max().item())}
            rows.append(row)
    return rows


def measure_partition(b: int, n: int, d: int, peaks: dict, quick: bool) -> list[dict]:
    """The step after the eigensolver alone (``finish_partition``: sign, split, seed and each patch's
    cosine to its sample's foreground mean feature): the torch reference (some twenty small ops, and a
    float32 copy of the features normalised, masked and summed: about 1.3 GB at the headline) against the
    kernels' one launch (the features read twice in their own dtype). Floor: features and v read once,
    the three outputs written once. A kernel whose foreground differs from the reference's, or whose
    fiedler or scores are more than 1e-5 off, is not timed."""
    warmup, rep = (10, 30) if quick else (25, 100)
    feats = planted_features(b, n, d)
    v = torch.randn(b, n, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(1))
    case = {"B": b, "N": n, "D": d, "dtype": "bf16"}
    bytes_moved = b * n * d * feats.element_size() + b * n * (4 + 4 + 1 + 4)
    want = finish_partition(feats, v)
    rows = [make_row("ncut_partition", case, "torch",
                     time_ms(lambda: finish_partition(feats, v), warmup, rep), bytes_moved, 0, peaks)]
    impls = {backend: (lambda backend=backend: finish_partition(feats, v, backend))
             for backend in ("triton", "cuda") if backend in available_backends(DEVICE)}
    if "cuda" in impls:
        # what the op's cuda path runs for 16-bit features with N <= D: the same step from the solver's
        # Gram matrix (made here as the solver makes it), reading its foreground rows instead of the features
        gram = torch.bmm(feats.float(), feats.float().transpose(1, 2))
        impls["cuda_gram"] = lambda: NCut(*torch.ops.maskedssl.ncut_partition_gram_cuda(
            feats, gram, v, SEED_TIE, SPLIT_TIE))
    if "triton" in impls and partition_from_cosines(feats):
        # what the op's triton path runs there: the step from the solver's cosine matrix (made here as its
        # kernels make it), reading the foreground's rows instead of the features
        unit = torch.nn.functional.normalize(feats.float(), dim=-1)
        cos = torch.bmm(unit, unit.transpose(1, 2))
        impls["triton_cos"] = lambda: NCut(*partition_from_cos(feats, cos, v, SEED_TIE, SPLIT_TIE))
    for impl, fn in impls.items():
        got = fn()
        err = max((got.fiedler - want.fiedler).abs().max().item(),
                  (got.score - want.score).abs().max().item())
        if not (torch.equal(got.foreground, want.foreground) and err <= 1e-5):
            raise AssertionError(f"{impl} partition differs from the reference (max error {err:.3g}) "
                                 f"at {case}")
        if impl in ("cuda_gram", "triton_cos"):  # the foreground's rows of G (and its diagonal) or of C
            diagonal = b * n if impl == "cuda_gram" else 0
            moved = 4 * (diagonal + int(want.foreground.sum()) * n) + b * n * (4 + 4 + 1 + 4)
            row = make_row("ncut_partition", case, impl, time_ms(fn, warmup, rep), moved, 0, peaks)
            row["extra"] = {"max_abs_err": err, "floor_bytes_of_the_features_path": bytes_moved}
        else:
            row = make_row("ncut_partition", case, impl, time_ms(fn, warmup, rep), bytes_moved, 0, peaks)
            row["extra"] = {"max_abs_err": err}
        rows.append(row)
    return rows


def run(peaks: dict, quick: bool = False) -> list[dict]:
    rows = measure_case(*HEADLINE, peaks, quick) + measure_partition(*HEADLINE, peaks, quick)
    if not quick:
        for shape in SWEEP:
            if shape != HEADLINE:
                rows += measure_case(*shape, peaks, quick)
    return rows


if __name__ == "__main__":
    bench_main("ncut", run)
