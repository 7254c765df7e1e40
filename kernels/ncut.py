"""Normalized-cut Fiedler vector per sample (TokenCut's bi-partition), for ``maskedssl.ops.ncut``.

For each sample b of ``feats`` (B, N, D) (any strides; fp32, bf16 or fp16):
  A_ij = max(cos(f_i, f_j), eps), or TokenCut's binary graph (1 where cos > tau, eps elsewhere);
  d = A 1;  M = D^-1/2 A D^-1/2;  u = second eigenvector of M;  v = D^-1/2 u  -> (B, N) float32.
Sign, split and seed rule (those of ``maskedssl.ops.ncut.split_partition``) and each patch's score against
the foreground's mean feature are applied afterwards by the partition step (below).

Affinity: cosines from tensor-core dot products (``tl.dot``; bf16/fp16 operands are exact in the fp32
accumulator, fp32 operands use 3xTF32 so they keep fp32 accuracy), scaled by the row norms. (The CUDA
backend, csrc/ncut.cu, takes the Gram matrix from cuBLAS instead and applies the affinity inside its solver.)

Eigensolver (identical in csrc/ncut.cu): Lanczos on M with the known top eigenvector u1 = D^1/2 1 / |.|
projected out of every vector, full reorthogonalisation (two block Gram-Schmidt passes against the basis
and u1), a basis of at most STEPS = 32 vectors, explicit restarts from the Ritz vector, at most
MAX_CYCLES = 16 cycles (512 matrix-vector products). Every CHECK = 8 steps (and at a cycle's end) the top
eigenpair of the tridiagonal T is found -- eigenvalue by Sturm-count multisection (64 shifts, 4 rounds),
eigenvector by 3 steps of inverse iteration on the positive definite sigma I - T (LDL^T, no pivoting
needed) -- and the solve stops once the residual |M y - theta y| = beta_k |z_k| <= TOL = 1e-6. Lanczos
converges like a Chebyshev filter on [lambda_min, lambda_3] without needing those bounds. The start vector
is fixed ((-1)^i (1 + h(i)), h the lowbias32 hash scaled to [0, 1)), so results are deterministic; its
alternating sign keeps it off
u1 (all positive), so even N = 2 and fully degenerate graphs (identical or zero features: M = u1 u1^T)
give a valid vector (the start vector, deflated) instead of a division by zero. Rows of zeros of degree
below 1 (N eps) then take their entry of v from their row of A v = theta D v, theta the Ritz value, not
from u / sqrt(N eps) (``_zero_rows``).

Layout and paths:
  N <= 128 (on chip): one program per sample builds A from feats with ``tl.dot`` in registers and keeps
    M there for the whole solve; it writes v, and its cosines C (B, N, N) fp32 only when the partition
    step reads them (``WRITE_COS``).
  N > 128 (tiled): ``_affinity_kernel`` (one program per sample and block of 32 rows) writes the cosines
    C (B, N, N) fp32, the degrees of A, d (B, N), and the rows' squared norms (B, N) to a workspace
    (``workspace``: the op's input check runs on those norms between this launch and the solver's); the
    solver program then streams C in row blocks for each product, applying the affinity rule to each tile
    (it stays in L2 for moderate B*N^2).
  Scratch: the Lanczos basis (B, STEPS, N_PAD) and the tridiagonal (B, 5 * STEPS) fp32 per sample.
  On request (``count_products``, for ``maskedssl.ops.ncut.lanczos_products``) the solver also writes how
  many products each sample took, int32 (B,): a compile-time switch, so the default kernel is unchanged.

Partition step (``bipartition``): ``_partition_kernel`` from the features (read twice), or, for 16-bit
features with N <= D on the tiled path and 2 N <= D on chip (``partition_from_cosines``),
``_partition_cos_kernel`` from the foreground's rows of C, with the samples whose foreground's unit rows
nearly cancel redone from the features by a second, masked launch.

Cost: affinity 2 B N^2 D FLOPs (+ reading feats once: B N D elements); each Lanczos step one product
(2 N^2 FLOPs) and the reorthogonalisation (8 j N FLOPs at step j). Tiled path: C written once and read
once per step from L2 (4 N^2 bytes). Partition: feats read twice more (B N D elements each), or the
foreground's rows of C (about 2 N^2 bytes a sample for a balanced cut; on chip C's 4 N^2 bytes are written
for this step only), 9 B N bytes written. By count at B = 256, N = 196, D = 768 in bf16 (tiled): 77 MB
of features, 39 MB of C written and at least once read, then about 20 MB of C for the partition where the
features path read 154 MB, and 0.2 MB of row norms for the op's input check where the features would be
77 MB: about 175 MB in all (not measured on a GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._utils import empty_output

STEPS = 32  # Lanczos basis per cycle
CHECK = 8  # steps between convergence tests
MAX_CYCLES = 16  # restarts: at most STEPS * MAX_CYCLES products
TOL = 1e-6  # residual |M y - theta y| (M has norm 1)
SHIFTS = 64  # multisection shifts per round
ROUNDS = 4  # multisection rounds: interval shrinks by 65^4
DELTA = 4e-6  # sigma - theta_max for inverse iteration (> the multisection interval)
INV_ITERS = 3
PIVMIN = 1e-30
ON_CHIP_MAX = 128  # largest N_PAD whose M the solver keeps in registers
ROW_BLOCK = 32  # affinity rows per program on the tiled path


@triton.jit
def _cosine_tile(f_ptr, rows, cols, row_ok, col_ok, D, s_n, s_d,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """cos(f_rows, f_cols) as a (len(rows), len(cols)) fp32 tile (zero rows give 0, F.normalize's rule), and
    the rows' squared norms summed in fp32."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    sq_r = tl.zeros((rows.shape[0],), dtype=tl.float32)
    sq_c = tl.zeros((cols.shape[0],), dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        fr = tl.load(f_ptr + rows[:, None] * s_n + ks[None, :] * s_d, mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0)
        fc = tl.load(f_ptr + cols[:, None] * s_n + ks[None, :] * s_d, mask=col_ok[:, None] & k_ok[None, :],
                     other=0.0)
        if PRECISION == "ieee":  # the interpreter's bf16 dot is wrong: give it fp32 operands
            fr = fr.to(tl.float32)
            fc = fc.to(tl.float32)
        acc = tl.dot(fr, tl.trans(fc), acc, input_precision=PRECISION)
        fr = fr.to(tl.float32)
        fc = fc.to(tl.float32)
        sq_r += tl.sum(fr * fr, axis=1)
        sq_c += tl.sum(fc * fc, axis=1)
    inv_r = 1.0 / tl.maximum(tl.sqrt(sq_r), 1e-12)
    inv_c = 1.0 / tl.maximum(tl.sqrt(sq_c), 1e-12)
    return acc * inv_r[:, None] * inv_c[None, :], sq_r


@triton.jit
def _affinity(cos, ok, tau, eps, USE_TAU: tl.constexpr):
    if USE_TAU:
        a = tl.where(cos > tau, 1.0, eps)
    else:
        a = tl.maximum(cos, eps)
    return tl.where(ok, a, 0.0)


@triton.jit
def _affinity_kernel(f_ptr, c_ptr, deg_ptr, sq_ptr, N, D, s_b, s_n, s_d, tau, eps,
                     USE_TAU: tl.constexpr, PRECISION: tl.constexpr, BLOCK_I: tl.constexpr,
                     BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tiled path's workspace: the cosines C (B, N, N) (the solver applies the affinity rule to each tile
    it reads, and ``_partition_cos_kernel`` takes the scores from C), the degrees of A, (B, N), and the rows'
    squared norms, (B, N) (the op's input check reads them instead of the features)."""
    b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok = rows < N
    f_ptr += b.to(tl.int64) * s_b
    c_ptr += b.to(tl.int64) * N * N
    deg = tl.zeros((BLOCK_I,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_I,), dtype=tl.float32)
    for j in range(0, N, BLOCK_J):
        cols = j + tl.arange(0, BLOCK_J)
        col_ok = cols < N
        cos, sq = _cosine_tile(f_ptr, rows, cols, row_ok, col_ok, D, s_n, s_d, BLOCK_K, PRECISION)
        ok = row_ok[:, None] & col_ok[None, :]
        deg += tl.sum(_affinity(cos, ok, tau, eps, USE_TAU), axis=1)
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], cos, mask=ok)
    tl.store(deg_ptr + b * N + rows, deg, mask=row_ok)
    tl.store(sq_ptr + b * N + rows, sq, mask=row_ok)


@triton.jit
def _hash01(i):
    """A fixed pseudo-random value in [0, 1) per index (the lowbias32 integer hash)."""
    h = i.to(tl.uint32)
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    h = h ^ (h >> 16)
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _dot(x, y):
    return tl.sum(x * y, axis=0)


@triton.jit
def _top_ritz(t_ptr, k, STEPS: tl.constexpr, SHIFTS: tl.constexpr, ROUNDS: tl.constexpr,
              DELTA: tl.constexpr, INV_ITERS: tl.constexpr, PIVMIN: tl.constexpr):
    """Top eigenvector z (STEPS,), zero past k, of the k x k tridiagonal T stored at t_ptr as
    alpha[0:STEPS], beta[STEPS:2 STEPS] (beta_i couples i and i + 1); 3 STEPS more floats are scratch."""
    idx = tl.arange(0, STEPS)
    live = idx < k
    alpha = tl.load(t_ptr + idx, mask=live, other=0.0)
    beta_next = tl.abs(tl.load(t_ptr + STEPS + idx, mask=idx < k - 1, other=0.0))
    beta_prev = tl.abs(tl.load(t_ptr + STEPS + idx - 1, mask=live & (idx > 0), other=0.0))
    # Gershgorin interval, then multisection on the Sturm count (number of eigenvalues below a shift =
    # number of negative pivots of T - shift I): keep the subinterval holding the largest eigenvalue
    lo = tl.min(tl.where(live, alpha - beta_prev - beta_next, float("inf")), axis=0)
    hi = tl.max(tl.where(live, alpha + beta_prev + beta_next, -float("inf")), axis=0)
    frac = (tl.arange(0, SHIFTS) + 1).to(tl.float32) / (SHIFTS + 1)
    for _ in tl.static_range(ROUNDS):
        shift = lo + (hi - lo) * frac
        piv = tl.load(t_ptr) - shift
        below = (piv < 0).to(tl.int32)
        for i in range(1, k):
            piv = tl.where(tl.abs(piv) < PIVMIN, -PIVMIN, piv)
            b = tl.load(t_ptr + STEPS + i - 1)
            piv = (tl.load(t_ptr + i) - shift) - b * b / piv
            below += (piv < 0).to(tl.int32)
        lo = tl.max(tl.where(below < k, shift, lo), axis=0)
        hi = tl.min(tl.where(below == k, shift, hi), axis=0)
    # inverse iteration with sigma just above the top eigenvalue: sigma I - T is positive definite,
    # factored once as L D L^T without pivoting (l_i = beta_{i-1} / d_{i-1}); then every iteration is two
    # sweeps of multiply-adds over rhs (forward in place, then backward)
    sigma = hi + DELTA
    rhs_ptr = t_ptr + 2 * STEPS
    d_inv_ptr = t_ptr + 3 * STEPS
    l_ptr = t_ptr + 4 * STEPS
    piv = tl.maximum(sigma - tl.load(t_ptr), PIVMIN)
    tl.store(d_inv_ptr, 1.0 / piv)
    for i in range(1, k):
        b = tl.load(t_ptr + STEPS + i - 1)
        l_i = b / piv
        piv = tl.maximum((sigma - tl.load(t_ptr + i)) - l_i * b, PIVMIN)
        tl.store(l_ptr + i, l_i)
        tl.store(d_inv_ptr + i, 1.0 / piv)
    z = tl.where(live, 1.0, 0.0)
    for _ in tl.static_range(INV_ITERS):
        tl.store(rhs_ptr + idx, z)  # also the factorization's stores are fenced by this barrier
        tl.debug_barrier()
        u = tl.load(rhs_ptr)
        for i in range(1, k):  # L y = z, in place: entry i is read before it is overwritten
            u = tl.load(rhs_ptr + i) + tl.load(l_ptr + i) * u
            tl.store(rhs_ptr + i, u)
        tl.debug_barrier()
        zi = u * tl.load(d_inv_ptr + k - 1)  # D L^T z = y
        z = tl.where(idx == k - 1, zi, 0.0)
        for t in range(0, k - 1):
            i = k - 2 - t
            zi = (tl.load(rhs_ptr + i) + tl.load(t_ptr + STEPS + i) * zi) * tl.load(d_inv_ptr + i)
            z = tl.where(idx == i, zi, z)
        z = z / tl.sqrt(_dot(z, z))
        tl.debug_barrier()  # the next iteration overwrites rhs, read above
    return z


@triton.jit
def _solver_kernel(f_ptr, c_ptr, deg_ptr, q_ptr, t_ptr, v_ptr, p_ptr, N, D, s_b, s_n, s_d, tau, eps,
                   USE_TAU: tl.constexpr, COUNT_PRODUCTS: tl.constexpr, PRECISION: tl.constexpr,
                   ON_CHIP: tl.constexpr, WRITE_COS: tl.constexpr, N_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_R: tl.constexpr, Q_CHUNK: tl.constexpr,
                   STEPS: tl.constexpr, CHECK: tl.constexpr, MAX_CYCLES: tl.constexpr, TOL: tl.constexpr,
                   SHIFTS: tl.constexpr, ROUNDS: tl.constexpr, DELTA: tl.constexpr,
                   INV_ITERS: tl.constexpr, PIVMIN: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, N_PAD)
    ok = offs < N
    q_ptr += b * STEPS * N_PAD
    t_ptr += b * 5 * STEPS
    if ON_CHIP:
        cos, _row_sq = _cosine_tile(f_ptr + b * s_b, offs, offs, ok, ok, D, s_n, s_d, BLOCK_K, PRECISION)
        pair_ok = ok[:, None] & ok[None, :]
        if WRITE_COS:  # for the partition step (``partition_from_cos``)
            tl.store(c_ptr + b * N * N + offs[:, None] * N + offs[None, :], cos, mask=pair_ok)
        a = _affinity(cos, pair_ok, tau, eps, USE_TAU)
        # rows of zeros (cosine 0 with every row, their own included), kept in v's output row until the end
        # rather than in registers through the solve
        is_zero = tl.sum(tl.where(offs[:, None] == offs[None, :], cos, 0.0), axis=1) == 0.0
        tl.store(v_ptr + b * N + offs, is_zero.to(tl.float32), mask=ok)
        zeros = tl.sum(tl.where(ok & is_zero, 1.0, 0.0), axis=0)
        deg = tl.sum(a, axis=1)
        d_isqrt = tl.where(ok, 1.0 / tl.sqrt(tl.where(ok, deg, 1.0)), 0.0)
        m = a * d_isqrt[:, None] * d_isqrt[None, :]
    else:
        c_ptr += b * N * N
        deg_ptr += b * N
        deg = tl.load(deg_ptr + offs, mask=ok, other=0.0)
    u1 = tl.sqrt(deg)
    u1 = u1 / tl.sqrt(_dot(u1, u1))
    # fixed start vector: alternating signs keep it off u1, whose entries are all positive; magnitudes
    # from an integer hash (not a low-discrepancy sequence, whose sums over index blocks nearly cancel:
    # orthogonal to the Fiedler vector of two equal halves, so Lanczos stopped in the wrong eigenspace)
    x = tl.where(offs % 2 == 0, 1.0, -1.0) * (1.0 + _hash01(offs))
    x = tl.where(ok, x, 0.0)
    rows_c = tl.arange(0, Q_CHUNK)
    z = tl.zeros((STEPS,), dtype=tl.float32)
    cycle = 0
    converged = 0
    steps = 0  # products taken, for the optional p_ptr output
    while (cycle < MAX_CYCLES) & (converged == 0):
        x = x - _dot(x, u1) * u1
        q = x / tl.sqrt(_dot(x, x))
        tl.store(q_ptr + offs, q)
        tl.debug_barrier()
        q_prev = tl.zeros((N_PAD,), dtype=tl.float32)
        beta_prev = 0.0
        j = 0
        while (j < STEPS) & (converged == 0):
            if ON_CHIP:
                w = tl.sum(m * q[:, None], axis=0)  # M is symmetric: M q = M^T q
            else:
                w = tl.zeros((N_PAD,), dtype=tl.float32)
                for r in range(0, N, BLOCK_R):
                    rr = r + tl.arange(0, BLOCK_R)
                    r_ok = rr < N
                    qr = tl.load(q_ptr + j * N_PAD + rr, mask=r_ok, other=0.0)
                    qr = qr / tl.sqrt(tl.load(deg_ptr + rr, mask=r_ok, other=1.0))
                    tile_ok = r_ok[:, None] & ok[None, :]
                    c_tile = tl.load(c_ptr + rr[:, None] * N + offs[None, :], mask=tile_ok, other=0.0)
                    tile = _affinity(c_tile, tile_ok, tau, eps, USE_TAU)
                    w += tl.sum(tile * qr[:, None], axis=0)
                w = w / tl.sqrt(tl.where(ok, deg, 1.0))
            alpha = _dot(q, w)
            w = w - alpha * q - beta_prev * q_prev
            for _ in tl.static_range(2):
                w = w - _dot(w, u1) * u1
                for c in range(0, j + 1, Q_CHUNK):
                    basis = tl.load(q_ptr + (c + rows_c)[:, None] * N_PAD + offs[None, :],
                                    mask=(c + rows_c <= j)[:, None], other=0.0)
                    h = tl.sum(basis * w[None, :], axis=1)
                    w = w - tl.sum(basis * h[:, None], axis=0)
            beta = tl.sqrt(_dot(w, w))
            tl.store(t_ptr + j, alpha)
            tl.store(t_ptr + STEPS + j, beta)
            j += 1
            steps += 1
            if (j % CHECK == 0) | (j == STEPS) | (beta <= TOL):
                tl.debug_barrier()
                z = _top_ritz(t_ptr, j, STEPS, SHIFTS, ROUNDS, DELTA, INV_ITERS, PIVMIN)
                z_last = tl.sum(tl.where(tl.arange(0, STEPS) == j - 1, z, 0.0), axis=0)
                if beta * tl.abs(z_last) <= TOL:
                    converged = 1
            q_prev = q
            q = w / tl.maximum(beta, PIVMIN)
            beta_prev = beta
            if j < STEPS:
                tl.store(q_ptr + j * N_PAD + offs, q)
            tl.debug_barrier()
        # Ritz vector: the basis combined with the tridiagonal's top eigenvector (rows past j are stale)
        x = tl.zeros((N_PAD,), dtype=tl.float32)
        for c in range(0, j, Q_CHUNK):
            basis = tl.load(q_ptr + (c + rows_c)[:, None] * N_PAD + offs[None, :],
                            mask=(c + rows_c < j)[:, None], other=0.0)
            picked = tl.arange(0, STEPS)[None, :] == (c + rows_c)[:, None]
            zc = tl.sum(tl.where(picked, z[None, :], 0.0), axis=1)
            x += tl.sum(basis * zc[:, None], axis=0)
        tl.debug_barrier()
        cycle += 1
    if ON_CHIP:
        v = x * d_isqrt
        zero = ok & (tl.load(v_ptr + b * N + offs, mask=ok, other=0.0) != 0.0)
        low = d_isqrt > 1.0  # degree below 1 (deg itself is not kept through the solve)
    else:
        v = x / tl.sqrt(tl.where(ok, deg, 1.0))
        zero = ok & (tl.load(c_ptr + offs * N + offs, mask=ok, other=1.0) == 0.0)
        zeros = tl.sum(tl.where(zero, 1.0, 0.0), axis=0)
        low = deg < 1.0
    # Rows of zeros with degree below 1 (N eps): their entries of v from the exact eigen-equation, not from
    # u / sqrt(d), which multiplies the solver's error by 1 / sqrt(N eps) (see _zero_rows)
    steps_idx = tl.arange(0, STEPS)
    z_next = tl.sum(tl.where(steps_idx[None, :] == steps_idx[:, None] + 1, z[None, :], 0.0), axis=1)
    # the Ritz value z^T T z; z is zero past the last cycle's steps, where T's scratch is stale
    alpha = tl.load(t_ptr + steps_idx, mask=z != 0.0, other=0.0)
    beta = tl.load(t_ptr + STEPS + steps_idx, mask=z != 0.0, other=0.0)
    theta = tl.sum(z * (alpha * z + 2.0 * beta * z_next), axis=0)
    v = _zero_rows(v, zero & low, zero, zeros, ok, theta, N, TOL)
    tl.store(v_ptr + b * N + offs, v, mask=ok)
    if COUNT_PRODUCTS:
        tl.store(p_ptr + b, steps)


@triton.jit
def _zero_rows(v, fix, zero, k, ok, theta, N, TOL: tl.constexpr):
    """v with the entries at ``fix`` (rows of zeros of degree below 1) set from the eigen-equation.

    A row of zeros z has A_zj = a for every j (eps, or 1 where tau < 0), so row z of A v = theta D v reads
    a sum(v) = theta N a v_z: with k rows of zeros, all at the same v_z, and S the sum of v over the other
    rows, v_z = S / (N theta - k). That takes only the other rows' entries, whose error the fp32 solver
    keeps near its tolerance, where v_z = u_z / sqrt(N eps) multiplies the error of u_z by 1 / sqrt(N eps)
    (about 80 at N = 16, eps = 1e-5): enough to move mean(v) past entries exactly at it (on a binary graph
    with one cut pair and one zero row, 148 of 150 rows went to the foreground) or the zero row to the
    wrong side. Left as solved where theta is within TOL of 0 (differences between rows of zeros have
    eigenvalue 0: not all equal there, as in an all-zero sample) or N theta within N TOL of k."""
    rest = tl.sum(tl.where(ok & ~zero, v, 0.0), axis=0)
    den = N * theta - k
    # how far theta is from both: one comparison (the interpreter cannot combine scalar comparisons by &)
    margin = tl.minimum(tl.abs(theta) - TOL, tl.abs(den) - N * TOL)
    refined = rest / tl.where(margin > 0, den, 1.0)
    return tl.where(fix, tl.where(margin > 0, refined, v), v)


@triton.jit
def _feature_rows(f_ptr, rows, row_ok, cols, col_ok, s_n, s_d):
    """A (rows, cols) tile of one sample's features in fp32, zeros outside."""
    return tl.load(f_ptr + rows[:, None] * s_n + cols[None, :] * s_d, mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _split(v_ptr, fiedler_ptr, fg_ptr, b, N, offs, ok, seed_scale, split_tie, live):
    """Sample b's split by the rules of ``maskedssl.ops.ncut.split_partition`` (seed = the first index with
    |v| >= seed_scale max |v|; sign so the seed is above the mean; unit norm; the foreground above
    cut = the mean + split_tie max |fiedler|, or everything): stores fiedler and foreground where ``live``;
    returns the foreground and what ``_row_foreground`` needs to recompute a row block's with the same
    arithmetic."""
    v = tl.load(v_ptr + b * N + offs, mask=ok, other=0.0)
    magnitude = tl.abs(v)
    top = tl.max(magnitude, axis=0)
    near_top = ok & (magnitude >= top * seed_scale)
    seed = tl.min(tl.where(near_top, offs, offs.shape[0]), axis=0)
    mean_v = tl.sum(v, axis=0) / N
    sign = tl.where(tl.sum(tl.where(offs == seed, v, 0.0), axis=0) > mean_v, 1.0, -1.0)
    norm = tl.maximum(tl.sqrt(tl.sum(v * v, axis=0)), 1e-12)  # |v sign| = |v|
    fiedler = (v * sign) / norm
    cut = tl.sum(fiedler, axis=0) / N + split_tie * (top / norm)  # top / norm: max |fiedler|
    fg = ok & (fiedler > cut)
    empty = tl.sum(fg.to(tl.int32), axis=0) == 0  # a constant v: everything is foreground
    fg = fg | (ok & empty)
    tl.store(fiedler_ptr + b * N + offs, fiedler, mask=ok & live)
    tl.store(fg_ptr + b * N + offs, fg.to(tl.uint8), mask=ok & live)
    return fg, sign, norm, cut, empty


@triton.jit
def _row_foreground(v_ptr, b, N, rows, row_ok, sign, norm, cut, empty):
    v_rows = tl.load(v_ptr + b * N + rows, mask=row_ok, other=0.0)
    return row_ok & (((v_rows * sign) / norm > cut) | empty)


@triton.jit
def _partition_kernel(f_ptr, v_ptr, fiedler_ptr, fg_ptr, score_ptr, only_ptr, N, D, s_b, s_n, s_d,
                      seed_scale, split_tie, N_PAD: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                      ONLY: tl.constexpr):
    """One sample per program: ``_split`` on its vector v, then score_i = cos(f_i, m), m = the sum of
    f_j / |f_j| over the foreground, in two passes over the features: row norms and m, then the dot products
    with m (m in registers, a whole row of D_PAD columns per tile row). With ONLY, a program whose sample
    is not flagged in only_ptr (uint8 (B,)) reads and writes nothing."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, N_PAD)
    ok = offs < N
    n_rows = N
    live = offs == offs  # every program
    if ONLY:
        flagged = tl.load(only_ptr + b) != 0
        n_rows = tl.where(flagged, N, 0)
        live = live & flagged
    fg, sign, norm, cut, empty = _split(v_ptr, fiedler_ptr, fg_ptr, b, N, offs, ok, seed_scale, split_tie,
                                        live)

    f_ptr += b * s_b
    cols = tl.arange(0, D_PAD)
    col_ok = cols < D
    m = tl.zeros((D_PAD,), dtype=tl.float32)
    for r in range(0, n_rows, BLOCK_N):
        rows = r + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        f = _feature_rows(f_ptr, rows, row_ok, cols, col_ok, s_n, s_d)
        # f / max(|f|, 1e-12) as F.normalize divides (a reciprocal's rounding would leave m = 1e-8 where
        # the reference's unit rows cancel exactly, as D = 1 rows of both signs do)
        row_norm = tl.maximum(tl.sqrt(tl.sum(f * f, axis=1)), 1e-12)
        fg_rows = _row_foreground(v_ptr, b, N, rows, row_ok, sign, norm, cut, empty)
        m += tl.sum(tl.where(fg_rows[:, None], f / row_norm[:, None], 0.0), axis=0)
    count = tl.sum(fg.to(tl.float32), axis=0)
    # |m / count| floored at 1e-12, as F.normalize of the foreground's mean normalised feature
    inv_m = 1.0 / tl.maximum(tl.sqrt(tl.sum(m * m, axis=0)), count * 1e-12)
    for r in range(0, n_rows, BLOCK_N):
        rows = r + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        f = _feature_rows(f_ptr, rows, row_ok, cols, col_ok, s_n, s_d)
        inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(f * f, axis=1)), 1e-12)
        score = tl.sum(f * m[None, :], axis=1) * inv_norm * inv_m
        tl.store(score_ptr + b * N + rows, tl.minimum(tl.maximum(score, -1.0), 1.0), mask=row_ok)


@triton.jit
def _partition_cos_kernel(c_ptr, v_ptr, fiedler_ptr, fg_ptr, score_ptr, redo_ptr, N, seed_scale, split_tie,
                          min_mean_sq, N_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """``_partition_kernel``'s outputs from the solver's cosines C (B, N, N) instead of the features:
    with m the sum of the foreground's unit rows, f_i / |f_i| . m = s_i = the sum of C_ji over the
    foreground rows j, and |m|^2 = the sum of s_i over the foreground. Only the foreground's rows of C are
    read (N^2 / 2 floats for a balanced cut, where the features are 2 N D elements). C's rounding, relative
    to the unit rows, weighs as 1 / |m / count|^2 in the scores: a sample whose foreground's unit rows
    nearly cancel (|m / count|^2 < min_mean_sq) is flagged in redo_ptr (uint8 (B,)), its scores unwritten,
    for ``_partition_kernel`` to redo from the features."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, N_PAD)
    ok = offs < N
    fg, sign, norm, cut, empty = _split(v_ptr, fiedler_ptr, fg_ptr, b, N, offs, ok, seed_scale, split_tie, ok)
    c_ptr += b * N * N
    s = tl.zeros((N_PAD,), dtype=tl.float32)
    for r in range(0, N, BLOCK_R):
        rows = r + tl.arange(0, BLOCK_R)
        fg_rows = _row_foreground(v_ptr, b, N, rows, rows < N, sign, norm, cut, empty)
        # a row outside the foreground is not loaded at all (masked)
        s += tl.sum(tl.load(c_ptr + rows[:, None] * N + offs[None, :], mask=fg_rows[:, None] & ok[None, :],
                            other=0.0), axis=0)
    count = tl.sum(fg.to(tl.float32), axis=0)
    m_sq = tl.sum(tl.where(fg, s, 0.0), axis=0)
    trusted = m_sq >= min_mean_sq * count * count
    tl.store(redo_ptr + b, tl.where(trusted, 0, 1).to(tl.uint8))
    inv_m = 1.0 / tl.maximum(tl.sqrt(m_sq), count * 1e-12)
    score = tl.minimum(tl.maximum(s * inv_m, -1.0), 1.0)
    # the flag as a vector: the interpreter cannot AND a reduction's scalar into a vector mask
    keep = ok & ((tl.zeros((N_PAD,), dtype=tl.int32) + tl.where(trusted, 1, 0)) != 0)
    tl.store(score_ptr + b * N + offs, score, mask=keep)


def _block_k(d: int) -> int:
    return max(16, min(64, triton.next_power_of_2(d)))


def launch_config(n: int, d: int, fp32: bool = False) -> dict:
    """Block sizes and warps the launcher picks for N patches of D features (also read by the resource
    test, which compiles them for sm_80 and sm_90). fp32 features take shorter K blocks: 3xTF32 needs three
    products' operands, and the 16-bit blocks spilled registers (affinity kernel on sm_90 at 32 columns;
    on-chip solver on sm_80 at 64 columns for N_PAD = 64 and at 32 for N_PAD = 128)."""
    n_pad = max(16, triton.next_power_of_2(n))
    on_chip = n_pad <= ON_CHIP_MAX
    # elements of C or of the basis that a product or a reorthogonalisation pass holds at once. The tiled
    # path takes 8 a thread: at 16, Triton 3.6's ptxas (the GPU machines' torch 2.11) capped the solver at
    # 128 registers and spilled up to 136 bytes a thread at N_PAD = 256 and 32 at N_PAD = 512.
    tile = 4096 if on_chip else 2048
    if fp32:
        block_k = min(32 if n_pad <= 64 else 16, _block_k(d))
    else:
        block_k = _block_k(d) if on_chip and n_pad <= 64 else min(32, _block_k(d))
    return {
        "n_pad": n_pad, "on_chip": on_chip,
        "block_k": block_k,
        "block_r": max(1, tile // n_pad), "q_chunk": min(STEPS, max(1, tile // n_pad)),
        "num_warps": 4 if n_pad <= 32 else 8,
        "affinity_block_k": 16 if fp32 else 32,
    }


PARTITION_MAX_D = 8192  # a tile row holds a whole feature vector; wider features take the torch rules
PARTITION_TILE = 4096  # elements per tile, 16 a thread at 8 warps (8192 spilled on sm_90 at D = 768)
# _partition_cos_kernel trusts C for a sample whose foreground's mean unit row has at least this squared
# norm, and flags the others for the feature path (csrc/ncut.cu's kGramMinMeanSq)
COS_MIN_MEAN_SQ = 1e-2


def _partition_outputs(bsz: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (empty_output((bsz, n), torch.float32, device), empty_output((bsz, n), torch.uint8, device),
            empty_output((bsz, n), torch.float32, device))


def _launch_partition(feats, v, outputs, seed_tie, split_tie, only=None) -> None:
    bsz, n, d = feats.shape
    n_pad, d_pad = triton.next_power_of_2(n), triton.next_power_of_2(d)
    _partition_kernel[(bsz,)](
        feats, v, *outputs, v if only is None else only, n, d, *feats.stride(), 1.0 - seed_tie, split_tie,
        N_PAD=n_pad, BLOCK_N=max(1, min(n_pad, PARTITION_TILE // d_pad)), D_PAD=d_pad, ONLY=only is not None,
        num_warps=8)


def partition(feats: torch.Tensor, v: torch.Tensor, seed_tie: float, split_tie: float
              ) -> tuple[torch.Tensor, ...]:
    """``maskedssl.ops.ncut.finish_partition`` in one kernel launch: from each sample's vector ``v`` (B, N)
    float32, the signed unit ``fiedler`` (B, N) float32, the ``foreground`` (B, N) bool and each patch's
    ``score`` (B, N) float32, reading ``feats`` twice in its own dtype (D <= PARTITION_MAX_D)."""
    bsz, n, _ = feats.shape
    fiedler, foreground, score = _partition_outputs(bsz, n, feats.device)
    if bsz > 0:
        _launch_partition(feats, v.contiguous(), (fiedler, foreground, score), seed_tie, split_tie)
    return fiedler, foreground.view(torch.bool), score


def partition_from_cos(feats: torch.Tensor, cos: torch.Tensor, v: torch.Tensor, seed_tie: float,
                       split_tie: float) -> tuple[torch.Tensor, ...]:
    """``partition``'s outputs from the cosines ``cos`` (B, N, N) float32 of the features' rows (the tiled
    solver's workspace, or the on-chip solver's tile): the foreground's rows of ``cos`` instead of the
    features, then, in a second launch with no host sync, the features for the samples whose foreground's
    unit rows nearly cancel (``COS_MIN_MEAN_SQ``; the other programs of that launch return at once)."""
    bsz, n, d = feats.shape
    fiedler, foreground, score = _partition_outputs(bsz, n, feats.device)
    if bsz > 0:
        v = v.contiguous()
        redo = torch.empty(bsz, dtype=torch.uint8, device=feats.device)
        n_pad = triton.next_power_of_2(n)
        _partition_cos_kernel[(bsz,)](
            cos.contiguous(), v, fiedler, foreground, score, redo, n, 1.0 - seed_tie, split_tie,
            COS_MIN_MEAN_SQ, N_PAD=n_pad, BLOCK_R=max(1, PARTITION_TILE // n_pad), num_warps=8)
        _launch_partition(feats, v, (fiedler, foreground, score), seed_tie, split_tie, only=redo)
    return fiedler, foreground.view(torch.bool), score


def _precision(feats: torch.Tensor) -> str:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "ieee"
    # fp32 operands: 3xTF32 keeps fp32 accuracy; 16-bit operands are exact on tensor cores anyway
    return "tf32x3" if feats.dtype == torch.float32 else "tf32"


def tiled(n: int, d: int) -> bool:
    """Whether N patches take the tiled path, whose solver reads the ``workspace`` (N > ON_CHIP_MAX)."""
    return not launch_config(n, d)["on_chip"]


def workspace(feats: torch.Tensor, tau: float | None, eps: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tiled path's first launch: the cosines C (B, N, N), the degrees of the affinity (B, N) and the
    rows' squared norms (B, N), all float32 (sums of fp32 squares of the entries: the op's input check
    reads these, as the cuda backend's reads its Gram matrix's diagonal). ``_solve`` takes (C, degrees)."""
    bsz, n, d = feats.shape
    cos = torch.empty(bsz, n, n, device=feats.device, dtype=torch.float32)
    deg = torch.empty(bsz, n, device=feats.device, dtype=torch.float32)
    sq = torch.empty(bsz, n, device=feats.device, dtype=torch.float32)
    if bsz > 0:
        _affinity_kernel[(bsz, triton.cdiv(n, ROW_BLOCK))](
            feats, cos, deg, sq, n, d, *feats.stride(), 0.0 if tau is None else float(tau), eps,
            USE_TAU=tau is not None, PRECISION=_precision(feats), BLOCK_I=ROW_BLOCK, BLOCK_J=64,
            BLOCK_K=launch_config(n, d, fp32=feats.dtype == torch.float32)["affinity_block_k"], num_warps=4)
    return cos, deg, sq


def _solve(feats: torch.Tensor, tau: float | None, eps: float, count_products: bool,
           work: tuple[torch.Tensor, torch.Tensor] | None = None, want_cos: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``ncut_fiedler``'s outputs and the cosines C (B, N, N) float32: on the tiled path (N > ON_CHIP_MAX)
    its workspace, on chip the solver's own tile when ``want_cos`` (else None: nothing but v is written).
    ``work``: the tiled path's (C, degrees) from ``workspace`` for these features, tau and eps, when the
    caller has them (else the solver's launch makes them; on chip it is ignored)."""
    bsz, n, d = feats.shape
    dev = feats.device
    cfg = launch_config(n, d, fp32=feats.dtype == torch.float32)
    n_pad, on_chip = cfg["n_pad"], cfg["on_chip"]
    use_tau = tau is not None
    q = torch.empty(bsz, STEPS, n_pad, device=dev, dtype=torch.float32)
    t = torch.empty(bsz, 5 * STEPS, device=dev, dtype=torch.float32)
    v = empty_output((bsz, n), torch.float32, dev)
    products = empty_output((bsz if count_products else 0,), torch.int32, dev)
    if on_chip:
        cos = torch.empty(bsz, n, n, device=dev, dtype=torch.float32) if want_cos else None
        deg = None
    else:
        cos, deg = work if work is not None else workspace(feats, tau, eps)[:2]
    _solver_kernel[(bsz,)](
        feats, v if cos is None else cos, v if deg is None else deg, q, t, v,  # v: pointers not read
        products if count_products else v, n, d, *feats.stride(), 0.0 if tau is None else float(tau), eps,
        USE_TAU=use_tau, COUNT_PRODUCTS=count_products, PRECISION=_precision(feats), ON_CHIP=on_chip,
        WRITE_COS=on_chip and want_cos, N_PAD=n_pad, BLOCK_K=cfg["block_k"], BLOCK_R=cfg["block_r"],
        Q_CHUNK=cfg["q_chunk"],
        STEPS=STEPS, CHECK=CHECK, MAX_CYCLES=MAX_CYCLES, TOL=TOL, SHIFTS=SHIFTS, ROUNDS=ROUNDS, DELTA=DELTA,
        INV_ITERS=INV_ITERS, PIVMIN=PIVMIN, num_warps=cfg["num_warps"])
    return v, products, cos


def ncut_fiedler(feats: torch.Tensor, tau: float | None, eps: float, count_products: bool = False,
                 work: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) float32 generalized Fiedler vector D^-1/2 u of each sample's affinity graph (any sign/scale),
    and the matrix-vector products each sample's solve took: int32 (B,) when ``count_products``, else an
    empty tensor (as ``torch.ops.maskedssl.ncut_fiedler_cuda``). ``work``: as ``_solve`` takes it."""
    v, products, _ = _solve(feats, tau, eps, count_products, work)
    return v, products


def partition_from_cosines(feats: torch.Tensor) -> bool:
    """Whether ``bipartition`` takes the partition step from the cosines C: 16-bit features (fp32 features'
    C, from 3xTF32 products, is not as exact as 16-bit ones') with N <= D on the tiled path, which writes C
    anyway, and 2 N <= D on chip, where the solver writes C for this step only. Reading the foreground's
    rows of C costs 4 N^2 / 2 bytes for a balanced cut and 4 N^2 at most, the features read twice 4 N D
    bytes, so the rule never reads more on the tiled path (N <= D), and on chip, with C's write, at most
    8 N^2 <= 4 N D."""
    _, n, d = feats.shape
    most = d if tiled(n, d) else d // 2
    return feats.dtype in (torch.bfloat16, torch.float16) and n <= most and d <= PARTITION_MAX_D


def bipartition(feats: torch.Tensor, tau: float | None, eps: float, seed_tie: float, split_tie: float,
                work: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """The whole op on the Triton kernels (D <= PARTITION_MAX_D): solver, then the partition step from the
    cosines where ``partition_from_cosines``, else from the features. ``work``: as ``_solve`` takes it."""
    from_cos = partition_from_cosines(feats)
    v, _, cos = _solve(feats, tau, eps, False, work, want_cos=from_cos)
    if from_cos:
        return partition_from_cos(feats, cos, v, seed_tie, split_tie)
    return partition(feats, v, seed_tie, split_tie)
