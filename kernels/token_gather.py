"""Token gather / scatter for masked autoencoders: Triton kernels and their launchers.

    gather_tokens   out[b, k] = x[b, i] + pos[i],  i = ids_keep[b, k]                        (B, K, D)
    scatter_tokens  out[b, l] = (x_vis[b, r] if r < K else mask_token) + pos[l],
                    r = ids_restore[b, l]                                                   (B, L, D)

Forward. Both ops are one kernel, ``_gather_rows_kernel``: every output row copies one source row (or the
fill row) and adds one position row. The add is done in fp32 and rounded once to the data dtype, which is
what torch's ``a + b`` does for bf16/fp16 (and plain fp32 for fp32), so the result is bit-identical to the
torch backend.

Layout. Token tensors are (B, rows, D) with unit stride along D and any strides along B and rows (views
such as ``x.transpose(0, 1)`` of an (L, B, D) buffer need no copy); index tensors may have any strides;
pos must have unit stride along D. Outputs are contiguous. A program owns a [BLOCK_R, BLOCK_D] tile of
output rows. When D and the row strides are multiples of 16 elements (and the base pointers 16-byte
aligned), Triton's divisibility specialisation proves every row start aligned and the compiler emits
16-byte vector loads and stores; other shapes run the same code with narrower accesses.

Backward. ids_keep may repeat an index and ids_restore need not be a permutation, so a backward that
scattered gradient rows with plain stores would lose contributions, and float atomics would make the
bits depend on timing. ``_invert_index_kernel`` builds, per batch row, the inverse of the index in CSR
form: ``perm`` (a stable counting sort of the index) and ``starts[m]`` (how many entries are below m).
Every gradient row is then the fp32 sum, in index order, of its own segment of source rows
(``_segment_sum_kernel``): written exactly once (zeros for an empty segment), with a fixed order.
Sums over the batch (grad_pos, grad_mask_token) are accumulated in fp32 by each program over a chunk of
batch rows and stored as fp32 partials that torch sums in a fixed order: bitwise reproducible. In the
non-deterministic mode grad_pos (L*D addresses, little contention) is added with fp32 atomics into one
buffer instead, saving the partials' round trip through DRAM; grad_mask_token keeps its partials (all
programs would hit the same D addresses).

Bytes that must move (each element once; e = element size, i = index size), for ViT-B/16 at B = 256,
L = 196, K = 49 in bf16:
    gather forward    B*K*D*e read, B*K*D*e written, L*D*e pos, B*K*i          D = 768: ~39 MB
    scatter forward   B*K*D*e read, B*L*D*e written, (L+1)*D*e, B*L*i          D = 512: ~65 MB
    gather backward   B*K*D*e read, B*L*D*e written (+ L*D*e grad_pos)          D = 768: ~96 MB
    scatter backward  B*L*D*e read, B*K*D*e written, D*e (+ L*D*e grad_pos)    D = 512: ~64 MB
The backward adds the CSR (B*(N + M + 1) int32, written once and read once, N index entries and M target
rows per batch row) and, when a batch sum is needed, the fp32 partials, kept to a fraction of the
gradient bytes by ``_batch_chunk``. No FLOPs beyond one add per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import empty_output, round_to, to_fp32

# Elements per program tile: 4096 = 8 KB of bf16, 32 per thread at 4 warps (four 16-byte vectors).
_TILE_ELEMENTS = 4096
# Side of the square comparison tile of the counting sort.
_SORT_BLOCK = 64


def _block_d(d: int) -> int:
    """Width of a program's column block: a power of two dividing D when one of 64-256 does (no idle
    lanes), else the next power of two of D capped at 256."""
    for block in (256, 128, 64):
        if d % block == 0:
            return block
    return min(triton.next_power_of_2(d), 256)


def _block_rows(rows: int, block_d: int) -> int:
    return max(1, min(triton.next_power_of_2(max(rows, 1)), _TILE_ELEMENTS // block_d))


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    """Strided rows are fine for the kernels; only the D axis must be dense."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _batch_chunk(batch: int, main_bytes: int, partial_elements_per_chunk: int) -> int:
    """Batch rows one program sums over, when the op reduces over the batch.

    Each chunk of batch rows leaves one fp32 partial of ``partial_elements_per_chunk`` (stored and read
    back, or added atomically). Chunks are as many as keep those partials under 1/32 of the ``main_bytes``
    the kernel moves anyway (<= ~6% extra traffic); more chunks would mean more programs in flight. The
    ratio is a first guess, to be tuned on a GPU.
    """
    chunks = max(1, min(batch, main_bytes // max(1, 32 * 4 * partial_elements_per_chunk)))
    return triton.cdiv(batch, chunks)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _gather_rows_kernel(src_ptr, ids_ptr, fill_ptr, pos_ptr, out_ptr,
                        rows_out, rows_src, D,
                        src_stride_b, src_stride_r, ids_stride_b, ids_stride_r, pos_stride,
                        total_rows,
                        HAS_FILL: tl.constexpr, HAS_POS: tl.constexpr, POS_AT_INDEX: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, i] = (src[b, r] if r < rows_src else fill) + pos[r if POS_AT_INDEX else i], r = ids[b, i].
    Tiles run over the flattened (b, i) output rows, so a tile never idles at the end of a batch row."""
    flat = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = flat // rows_out
    i = flat - b * rows_out
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = flat < total_rows
    col_ok = cols < D
    tile_ok = row_ok[:, None] & col_ok[None, :]

    r = tl.load(ids_ptr + b * ids_stride_b + i * ids_stride_r, mask=row_ok, other=0).to(tl.int64)
    src_rows = src_ptr + b * src_stride_b + r * src_stride_r
    if HAS_FILL:
        visible = r < rows_src
        val = tl.load(src_rows[:, None] + cols[None, :], mask=tile_ok & visible[:, None])
        fill = tl.load(fill_ptr + cols, mask=col_ok)
        val = tl.where(visible[:, None], val, fill[None, :])
    else:
        val = tl.load(src_rows[:, None] + cols[None, :], mask=tile_ok)
    if HAS_POS:
        pos_rows = r if POS_AT_INDEX else i
        p = tl.load(pos_ptr + pos_rows[:, None] * pos_stride + cols[None, :], mask=tile_ok)
        val = round_to(to_fp32(val) + to_fp32(p), out_ptr.dtype.element_ty)
    tl.store(out_ptr + (flat * D)[:, None] + cols[None, :], val, mask=tile_ok)


def _gather_rows(src: torch.Tensor, ids: torch.Tensor, fill: torch.Tensor | None, pos: torch.Tensor | None,
                 pos_at_index: bool) -> torch.Tensor:
    batch, rows_src, d = src.shape
    rows_out = ids.shape[1]
    out = empty_output((batch, rows_out, d), src.dtype, src.device)
    if out.numel() == 0:
        return out
    src = _unit_stride_last(src)
    pos = _unit_stride_last(pos) if pos is not None else None
    fill = fill.contiguous() if fill is not None else None
    block_d = _block_d(d)
    total_rows = batch * rows_out
    block_r = _block_rows(total_rows, block_d)
    grid = (triton.cdiv(total_rows, block_r), triton.cdiv(d, block_d))
    _gather_rows_kernel[grid](
        src, ids, fill if fill is not None else src, pos if pos is not None else src, out,
        rows_out, rows_src, d,
        src.stride(0), src.stride(1), ids.stride(0), ids.stride(1), pos.stride(0) if pos is not None else 0,
        total_rows,
        HAS_FILL=fill is not None, HAS_POS=pos is not None, POS_AT_INDEX=pos_at_index,
        BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """(B, K, D): ``x[b, ids_keep[b, k]] + pos[ids_keep[b, k]]``. Inputs already validated."""
    return _gather_rows(x, ids_keep, None, pos, pos_at_index=True)


def scatter_tokens(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos: torch.Tensor | None) -> torch.Tensor:
    """(B, L, D): ``(x_vis[b, r] if r < K else mask_token) + pos[l]``. Inputs already validated."""
    return _gather_rows(x_vis, ids_restore, mask_token.reshape(-1), pos, pos_at_index=False)


# ----------------------------------------------------------------------------- index inversion
@triton.jit
def _invert_index_kernel(ids_ptr, perm_ptr, starts_ptr, N, M, ids_stride_b, ids_stride_n,
                         BLOCK: tl.constexpr):
    """For batch row b: starts[b, m] = #{n : ids[b, n] < m} for m in [0, M], and perm[b, rank(n)] = n with
    rank(n) = #{n' : (ids[b, n'], n') < (ids[b, n], n)}, a stable counting sort. O(N * (N + M)) compares
    on registers; N and M are a few hundred tokens."""
    b = tl.program_id(0).to(tl.int64)
    ids_row = ids_ptr + b * ids_stride_b
    offs = tl.arange(0, BLOCK)
    for m0 in range(0, M + 1, BLOCK):
        m = m0 + offs
        count = tl.zeros((BLOCK,), dtype=tl.int32)
        for n0 in range(0, N, BLOCK):
            n = n0 + offs
            # padding reads M, which is below no m <= M
            v = tl.load(ids_row + n * ids_stride_n, mask=n < N, other=M)
            count += tl.sum((v[None, :] < m[:, None]).to(tl.int32), axis=1)
        tl.store(starts_ptr + b * (M + 1) + m, count, mask=m <= M)
    for n0 in range(0, N, BLOCK):
        n = n0 + offs
        n_ok = n < N
        v = tl.load(ids_row + n * ids_stride_n, mask=n_ok, other=0)
        rank = tl.zeros((BLOCK,), dtype=tl.int32)
        for q0 in range(0, N, BLOCK):
            q = q0 + offs
            w = tl.load(ids_row + q * ids_stride_n, mask=q < N, other=0)
            before = (w[None, :] < v[:, None]) | ((w[None, :] == v[:, None]) & (q[None, :] < n[:, None]))
            rank += tl.sum((before & (q < N)[None, :]).to(tl.int32), axis=1)
        tl.store(perm_ptr + b * N + rank, n, mask=n_ok)


def invert_index(ids: torch.Tensor, num_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR inverse of ``ids`` (B, N) over target rows [0, num_targets): ``perm`` (B, N) int32 and
    ``starts`` (B, num_targets + 1) int32; the entries equal to m are ``perm[b, starts[b, m]:starts[b, m+1]]``
    in increasing order, and entries >= num_targets sort after ``starts[b, num_targets]``."""
    batch, n = ids.shape
    perm = torch.empty((batch, n), dtype=torch.int32, device=ids.device)
    starts = torch.empty((batch, num_targets + 1), dtype=torch.int32, device=ids.device)
    if batch > 0:
        _invert_index_kernel[(batch,)](ids, perm, starts, n, num_targets, ids.stride(0), ids.stride(1),
                                       BLOCK=_SORT_BLOCK)
    return perm, starts


# ----------------------------------------------------------------------------- backward
@triton.jit
def _segment_sum_kernel(grad_ptr, perm_ptr, starts_ptr, out_ptr, pos_part_ptr,
                        B, M, N, D, batch_chunk, row_blocks,
                        HAS_POS: tl.constexpr, ATOMIC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, m] = sum of grad[b, perm[b, j]] over j in [starts[b, m], starts[b, m+1]), in fp32, in order.
    With HAS_POS, also the sum over this program's batch chunk of out[:, m] into pos_part."""
    pid = tl.program_id(0)
    chunk = pid // row_blocks
    m = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_ok = m < M
    col_ok = cols < D
    pos_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for t in range(batch_chunk):
        b = (chunk * batch_chunk + t).to(tl.int64)
        row_ok = m_ok & (b < B)
        start = tl.load(starts_ptr + b * (M + 1) + m, mask=row_ok, other=0)
        count = tl.load(starts_ptr + b * (M + 1) + m + 1, mask=row_ok, other=0) - start
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for j in range(tl.max(count, axis=0)):
            take = j < count
            n = tl.load(perm_ptr + b * N + start + j, mask=take, other=0).to(tl.int64)
            g = tl.load(grad_ptr + ((b * N + n) * D)[:, None] + cols[None, :],
                        mask=take[:, None] & col_ok[None, :], other=0.0)
            acc += to_fp32(g)
        out_rows = (b * M + m) * D
        tl.store(out_ptr + out_rows[:, None] + cols[None, :], round_to(acc, out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
        if HAS_POS:
            pos_acc += acc
    if HAS_POS:
        tile_ok = m_ok[:, None] & col_ok[None, :]
        offs = (m * D)[:, None] + cols[None, :]
        if ATOMIC:
            tl.atomic_add(pos_part_ptr + offs, pos_acc, mask=tile_ok)
        else:
            tl.store(pos_part_ptr + chunk.to(tl.int64) * M * D + offs, pos_acc, mask=tile_ok)


@triton.jit
def _masked_sum_kernel(grad_ptr, ids_ptr, mask_part_ptr, pos_part_ptr,
                       B, L, K, D, ids_stride_b, ids_stride_l, batch_chunk, row_blocks,
                       HAS_POS: tl.constexpr, ATOMIC: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Over this program's batch chunk and rows: the sum of grad[b, l] where ids[b, l] >= K (one row of
    mask_part) and, with HAS_POS, the sum over the chunk of grad[:, l] (pos_part, stored per chunk or added
    atomically). Without HAS_POS only the masked rows are read: the segment sum reads the visible ones."""
    pid = tl.program_id(0)
    chunk = pid // row_blocks
    row_block = pid % row_blocks
    l = row_block * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    l_ok = l < L
    col_ok = cols < D
    mask_acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    pos_acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for t in range(batch_chunk):
        b = (chunk * batch_chunk + t).to(tl.int64)
        row_ok = l_ok & (b < B)
        r = tl.load(ids_ptr + b * ids_stride_b + l * ids_stride_l, mask=row_ok, other=0)
        masked = row_ok & (r >= K)
        read = row_ok if HAS_POS else masked
        g = to_fp32(tl.load(grad_ptr + ((b * L + l) * D)[:, None] + cols[None, :],
                             mask=read[:, None] & col_ok[None, :], other=0.0))
        mask_acc += tl.where(masked[:, None], g, 0.0)
        if HAS_POS:
            pos_acc += g
    # every program would add to the same D addresses: partials, never atomics, for the mask token
    tl.store(mask_part_ptr + pid.to(tl.int64) * D + cols, tl.sum(mask_acc, axis=0), mask=col_ok)
    if HAS_POS:
        tile_ok = l_ok[:, None] & col_ok[None, :]
        offs = (l * D)[:, None] + cols[None, :]
        if ATOMIC:
            tl.atomic_add(pos_part_ptr + offs, pos_acc, mask=tile_ok)
        else:
            tl.store(pos_part_ptr + chunk.to(tl.int64) * L * D + offs, pos_acc, mask=tile_ok)


def _batch_sum_buffer(chunks: int, shape: tuple[int, ...], deterministic: bool, device) -> torch.Tensor:
    """fp32 accumulator for a sum over the batch: one partial per chunk, or one buffer for atomics."""
    if deterministic:
        return torch.empty((chunks, *shape), dtype=torch.float32, device=device)
    return torch.zeros(shape, dtype=torch.float32, device=device)


def _finish_batch_sum(buffer: torch.Tensor, deterministic: bool, dtype: torch.dtype) -> torch.Tensor:
    return (buffer.sum(0) if deterministic else buffer).to(dtype)


def gather_tokens_backward(grad: torch.Tensor, ids_keep: torch.Tensor, length: int, need_pos: bool,
                           deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """grad (B, K, D) contiguous -> grad_x (B, L, D) (zeros where no index points, repeats summed) and
    grad_pos (L, D) = grad_x summed over the batch (shape (0,) when not ``need_pos``)."""
    batch, k, d = grad.shape
    grad_x = empty_output((batch, length, d), grad.dtype, grad.device)
    if grad_x.numel() == 0:
        return grad_x, grad.new_zeros((length, d) if need_pos else 0)
    perm, starts = invert_index(ids_keep, length)
    block_d = _block_d(d)
    block_m = _block_rows(length, block_d)
    row_blocks = triton.cdiv(length, block_m)
    chunk = _batch_chunk(batch, batch * length * d * grad.element_size(), length * d) if need_pos else 1
    chunks = triton.cdiv(batch, chunk)
    pos_part = _batch_sum_buffer(chunks, (length, d), deterministic, grad.device) if need_pos else grad_x
    _segment_sum_kernel[(chunks * row_blocks, triton.cdiv(d, block_d))](
        grad, perm, starts, grad_x, pos_part, batch, length, k, d, chunk, row_blocks,
        HAS_POS=need_pos, ATOMIC=need_pos and not deterministic, BLOCK_M=block_m, BLOCK_D=block_d)
    grad_pos = _finish_batch_sum(pos_part, deterministic, grad.dtype) if need_pos else grad.new_empty(0)
    return grad_x, grad_pos


def scatter_tokens_backward(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int, need_pos: bool,
                            deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad (B, L, D) contiguous -> grad_x_vis (B, K, D) (rows summed over the positions restored from
    them, zeros for rows never used), grad_mask_token (D,) (summed over every masked position of every
    batch row) and grad_pos (L, D) = grad summed over the batch (shape (0,) when not ``need_pos``)."""
    batch, length, d = grad.shape
    k = num_visible
    if grad.numel() == 0:
        grad_pos = grad.new_zeros((length, d) if need_pos else 0)
        return grad.new_zeros((batch, k, d)), grad.new_zeros(d), grad_pos
    grad_x_vis = empty_output((batch, k, d), grad.dtype, grad.device)
    block_d = _block_d(d)
    col_blocks = triton.cdiv(d, block_d)
    if k > 0:
        perm, starts = invert_index(ids_restore, k)
        block_k = _block_rows(k, block_d)
        row_blocks = triton.cdiv(k, block_k)
        _segment_sum_kernel[(batch * row_blocks, col_blocks)](
            grad, perm, starts, grad_x_vis, grad_x_vis, batch, k, length, d, 1, row_blocks,
            HAS_POS=False, ATOMIC=False, BLOCK_M=block_k, BLOCK_D=block_d)

    block_l = _block_rows(length, block_d)
    row_blocks = triton.cdiv(length, block_l)
    main_bytes = batch * length * d * grad.element_size()
    partial_per_chunk = row_blocks * d + (length * d if need_pos else 0)
    chunk = _batch_chunk(batch, main_bytes, partial_per_chunk)
    chunks = triton.cdiv(batch, chunk)
    mask_part = torch.empty((chunks * row_blocks, d), dtype=torch.float32, device=grad.device)
    pos_part = _batch_sum_buffer(chunks, (length, d), deterministic, grad.device) if need_pos else mask_part
    _masked_sum_kernel[(chunks * row_blocks, col_blocks)](
        grad, ids_restore, mask_part, pos_part, batch, length, k, d,
        ids_restore.stride(0), ids_restore.stride(1), chunk, row_blocks,
        HAS_POS=need_pos, ATOMIC=need_pos and not deterministic, BLOCK_L=block_l, BLOCK_D=block_d)
    grad_mask = mask_part.sum(0).to(grad.dtype)
    grad_pos = _finish_batch_sum(pos_part, deterministic, grad.dtype) if need_pos else grad.new_empty(0)
    return grad_x_vis, grad_mask, grad_pos
