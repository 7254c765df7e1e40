"""``gather_tokens`` (encoder: keep visible tokens, add their position embedding) and ``scatter_tokens``
(decoder: put visible tokens back in place, fill the rest with the mask token, add position embeddings).

Each is one ``torch.library.custom_op`` taking the resolved backend as a string (``torch``: the reference
below; ``triton``: ``maskedssl.kernels.token_gather``; ``cuda``: ``torch.ops.maskedssl.<op>_cuda`` from
``csrc/token_gather.cu``), with a fake implementation for tracing and autograd registered outside the
kernels; each backward is a custom op too, so ``torch.compile(fullgraph=True)`` traces through both, and
is itself differentiable (double backward) through the other direction's forward op.

Every backend computes the forward bit-identically (x + pos in fp32, rounded once, as torch does; a NaN stays
NaN, its sign and payload bits may differ). The backward accepts any valid index: repeated entries in
``ids_keep`` and an ``ids_restore`` that is not a permutation sum their gradient rows in fp32. The kernels'
sums over the batch (grad_pos, grad_mask_token) use no float atomics, bitwise reproducible, when
``torch.are_deterministic_algorithms_enabled()`` at forward time; otherwise grad_pos is accumulated with fp32
atomics (no partials round trip).

Index checks (``check_index_range``) cost one ``aminmax`` over the index and one device->host sync per
call; ``MASKEDSSL_CHECK_INDICES=0`` turns them off. Under ``torch.compile`` they are assertions the device
evaluates when the graph runs (one small reduction, no sync).
"""

from __future__ import annotations

import torch

from ._backend import cuda_extension_loaded, resolve_backend
from ._validate import INDEX_DTYPES, REFERENCE_DTYPES, check_index_range, check_same_device, check_tensor

# Not measured yet (no GPU where this was written): both kernel backends move each byte once; the CUDA
# one is expected ahead because its launch path (C++ dispatcher) is cheaper than Triton's Python launcher
# at these tens-of-microseconds sizes. Reorder from benchmarks/bench_token_gather.py results.
AUTO_ORDER = ("cuda", "triton", "torch")


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the half types (and fp32), float64 stays float64 (gradchecks)."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------- torch reference
def _gather_tokens_torch(x, ids_keep, pos):
    ids = ids_keep.long()
    out = torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    if pos is not None:
        out = out + pos[ids]
    return out


def _gather_tokens_backward_torch(grad, ids_keep, length, need_pos):
    b, _, d = grad.shape
    ids = ids_keep.long().unsqueeze(-1).expand(-1, -1, d)
    acc = _accumulate_dtype(grad.dtype)
    grad_x = grad.new_zeros(b, length, d, dtype=acc).scatter_add_(1, ids, grad.to(acc))
    grad_pos = grad_x.sum(0).to(grad.dtype) if need_pos else grad.new_empty(0)
    return grad_x.to(grad.dtype), grad_pos


def _scatter_tokens_torch(x_vis, ids_restore, mask_token, pos):
    b, k, d = x_vis.shape
    ids = ids_restore.long()
    padded = torch.cat([x_vis, mask_token.expand(b, 1, d)], dim=1)  # slot k holds the mask token
    out = torch.gather(padded, 1, ids.clamp(max=k).unsqueeze(-1).expand(-1, -1, d))
    if pos is not None:
        out = out + pos
    return out


def _scatter_tokens_backward_torch(grad, ids_restore, num_visible, need_pos):
    b, _, d = grad.shape
    acc = _accumulate_dtype(grad.dtype)
    grad_acc = grad.to(acc)
    # slot num_visible collects every masked position: the mask token's gradient per batch row
    ids = ids_restore.long().clamp(max=num_visible).unsqueeze(-1).expand(-1, -1, d)
    padded = grad.new_zeros(b, num_visible + 1, d, dtype=acc).scatter_add_(1, ids, grad_acc)
    grad_x_vis = padded[:, :num_visible].to(grad.dtype, copy=True)
    grad_mask = padded[:, num_visible].sum(0).to(grad.dtype)
    grad_pos = grad_acc.sum(0).to(grad.dtype) if need_pos else grad.new_empty(0)
    return grad_x_vis, grad_mask, grad_pos


def _kernels():
    from maskedssl.kernels import token_gather  # imports triton: only when a Triton backend runs

    return token_gather


# ----------------------------------------------------------------------------- registered ops
@torch.library.custom_op("maskedssl::gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None,
                      backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernels().gather_tokens(x, ids_keep, pos)
    if backend == "cuda":
        return torch.ops.maskedssl.gather_tokens_cuda(x, ids_keep, pos)
    return _gather_tokens_torch(x, ids_keep, pos)


@_gather_tokens_op.register_fake
def _(x, ids_keep, pos, backend):
    return x.new_empty(x.shape[0], ids_keep.shape[1], x.shape[2])


@torch.library.custom_op("maskedssl::gather_tokens_backward", mutates_args=())
def _gather_tokens_backward_op(grad: torch.Tensor, ids_keep: torch.Tensor, length: int, need_pos: bool,
                               deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _kernels().gather_tokens_backward(grad.contiguous(), ids_keep, length, need_pos, deterministic)
    if backend == "cuda":
        return torch.ops.maskedssl.gather_tokens_backward_cuda(grad, ids_keep, length, need_pos,
                                                               deterministic)
    return _gather_tokens_backward_torch(grad, ids_keep, length, need_pos)


def _gather_tokens_backward_fake(grad, ids_keep, length, need_pos, deterministic, backend="torch"):
    b, _, d = grad.shape
    return grad.new_empty(b, length, d), grad.new_empty((length, d) if need_pos else (0,))


_gather_tokens_backward_op.register_fake(_gather_tokens_backward_fake)


# The backward ops are linear in grad, and each one's adjoint is the other direction's forward op: the
# gradient of (grad_x, grad_pos) = gather_backward(grad) is gather(gg_x, ids) + gg_pos[ids], and likewise
# for scatter. Registering that makes double backward (gradgradcheck, gradient penalties) work.
def _backward_setup_context(ctx, inputs, output):
    """Shared by both backward ops: (grad, ids, rows, need_pos, deterministic, backend), where rows is the
    length L (gather) or the visible count K (scatter) of the tensor the forward op took."""
    grad, ids, rows, need_pos, _, backend = inputs
    ctx.save_for_backward(ids)
    ctx.shape = (grad.shape[0], rows, grad.shape[2])
    ctx.dtype = grad.dtype
    ctx.need_pos = need_pos
    ctx.backend = backend


def _gather_double_backward(ctx, grad_grad_x, grad_grad_pos):
    (ids_keep,) = ctx.saved_tensors
    if grad_grad_x is None:
        grad_grad_x = ids_keep.new_zeros(ctx.shape, dtype=ctx.dtype)
    pos = grad_grad_pos if ctx.need_pos and grad_grad_pos is not None else None
    grad_grad = torch.ops.maskedssl.gather_tokens(grad_grad_x, ids_keep, pos, ctx.backend)
    return grad_grad, None, None, None, None, None


_gather_tokens_backward_op.register_autograd(_gather_double_backward,
                                             setup_context=_backward_setup_context)


def _gather_setup_context(ctx, inputs, output):
    x, ids_keep, pos, backend = inputs
    ctx.save_for_backward(ids_keep)
    ctx.length = x.shape[1]
    ctx.has_pos = pos is not None
    ctx.backend = backend
    ctx.deterministic = torch.are_deterministic_algorithms_enabled()


def _gather_backward(ctx, grad):
    (ids_keep,) = ctx.saved_tensors
    need_pos = ctx.has_pos and ctx.needs_input_grad[2]
    grad_x, grad_pos = torch.ops.maskedssl.gather_tokens_backward(
        grad.contiguous(), ids_keep, ctx.length, need_pos, ctx.deterministic, ctx.backend)
    return grad_x, None, grad_pos if need_pos else None, None


_gather_tokens_op.register_autograd(_gather_backward, setup_context=_gather_setup_context)


@torch.library.custom_op("maskedssl::scatter_tokens", mutates_args=())
def _scatter_tokens_op(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                       pos: torch.Tensor | None, backend: str) -> torch.Tensor:
    if backend == "triton":
        return _kernels().scatter_tokens(x_vis, ids_restore, mask_token, pos)
    if backend == "cuda":
        return torch.ops.maskedssl.scatter_tokens_cuda(x_vis, ids_restore, mask_token, pos)
    return _scatter_tokens_torch(x_vis, ids_restore, mask_token, pos)


@_scatter_tokens_op.register_fake
def _(x_vis, ids_restore, mask_token, pos, backend):
    return x_vis.new_empty(x_vis.shape[0], ids_restore.shape[1], x_vis.shape[2])


@torch.library.custom_op("maskedssl::scatter_tokens_backward", mutates_args=())
def _scatter_tokens_backward_op(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int,
                                need_pos: bool, deterministic: bool, backend: str
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        return _kernels().scatter_tokens_backward(grad.contiguous(), ids_restore, num_visible, need_pos,
                                                  deterministic)
    if backend == "cuda":
        return torch.ops.maskedssl.scatter_tokens_backward_cuda(grad, ids_restore, num_visible, need_pos,
                                                                deterministic)
    return _scatter_tokens_backward_torch(grad, ids_restore, num_visible, need_pos)


def _scatter_tokens_backward_fake(grad, ids_restore, num_visible, need_pos, deterministic, backend="torch"):
    b, length, d = grad.shape
    return (grad.new_empty(b, num_visible, d), grad.new_empty(d),
            grad.new_empty((length, d) if need_pos else (0,)))


_scatter_tokens_backward_op.register_fake(_scatter_tokens_backward_fake)


def _scatter_double_backward(ctx, grad_grad_x_vis, grad_grad_mask, grad_grad_pos):
    (ids_restore,) = ctx.saved_tensors
    if grad_grad_x_vis is None:
        grad_grad_x_vis = ids_restore.new_zeros(ctx.shape, dtype=ctx.dtype)
    if grad_grad_mask is None:
        grad_grad_mask = ids_restore.new_zeros(ctx.shape[2], dtype=ctx.dtype)
    pos = grad_grad_pos if ctx.need_pos and grad_grad_pos is not None else None
    grad_grad = torch.ops.maskedssl.scatter_tokens(grad_grad_x_vis, ids_restore, grad_grad_mask, pos,
                                                   ctx.backend)
    return grad_grad, None, None, None, None, None


_scatter_tokens_backward_op.register_autograd(_scatter_double_backward,
                                              setup_context=_backward_setup_context)


def _scatter_setup_context(ctx, inputs, output):
    x_vis, ids_restore, _, pos, backend = inputs
    ctx.save_for_backward(ids_restore)
    ctx.num_visible = x_vis.shape[1]
    ctx.has_pos = pos is not None
    ctx.backend = backend
    ctx.deterministic = torch.are_deterministic_algorithms_enabled()


def _scatter_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    need_pos = ctx.has_pos and ctx.needs_input_grad[3]
    grad_x_vis, grad_mask, grad_pos = torch.ops.maskedssl.scatter_tokens_backward(
        grad.contiguous(), ids_restore, ctx.num_visible, need_pos, ctx.deterministic, ctx.backend)
    return grad_x_vis, None, grad_mask, grad_pos if need_pos else None, None


_scatter_tokens_op.register_autograd(_scatter_backward, setup_context=_scatter_setup_context)


# The CUDA kernels' own schemas (csrc/register.cpp) exist only once the extension is loaded. Their fakes
# mirror the public ops' (the CUDA backward ops take no backend argument).
if cuda_extension_loaded():
    torch.library.register_fake("maskedssl::gather_tokens_cuda")(
        lambda x, ids_keep, pos: x.new_empty(x.shape[0], ids_keep.shape[1], x.shape[2]))
    torch.library.register_fake("maskedssl::scatter_tokens_cuda")(
        lambda x_vis, ids_restore, mask_token, pos: x_vis.new_empty(x_vis.shape[0], ids_restore.shape[1],
                                                                    x_vis.shape[2]))
    torch.library.register_fake("maskedssl::gather_tokens_backward_cuda")(_gather_tokens_backward_fake)
    torch.library.register_fake("maskedssl::scatter_tokens_backward_cuda")(_scatter_tokens_backward_fake)


# ----------------------------------------------------------------------------- public API
def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None = None, *,
                  backend: str | None = None, check_indices: bool | None = None) -> torch.Tensor:
    """``out[b, k] = x[b, ids_keep[b, k]] + pos[ids_keep[b, k]]`` -> (B, K, D).

    x: (B, L, D) float32/bfloat16/float16 (float64 runs the torch backend), any strides; ids_keep: (B, K)
    int32/int64 in [0, L), repeats allowed; pos: (L, D) of x's dtype, or None. Differentiable in x and pos.
    The range check of ids_keep costs one ``aminmax`` and one device->host sync; ``check_indices=False``
    (for indices valid by construction) or ``MASKEDSSL_CHECK_INDICES=0`` skips it, and so does
    ``torch.compile``.
    """
    check_tensor("x", x, ndim=3, dtypes=REFERENCE_DTYPES, what="(B, L, D)")
    b, length, d = x.shape
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, what="(B, K)")
    if ids_keep.shape[0] != b:
        raise ValueError(f"ids_keep must have shape ({b}, K) to match x {tuple(x.shape)}, "
                         f"got {tuple(ids_keep.shape)}")
    if pos is not None:
        check_tensor("pos", pos, shape=(length, d), dtypes=REFERENCE_DTYPES)
        if pos.dtype != x.dtype:
            raise TypeError(f"pos must have x's dtype {x.dtype}, got {pos.dtype}")
    device = check_same_device(x=x, ids_keep=ids_keep, pos=pos)
    check_index_range("ids_keep", ids_keep, length, check_indices)
    name = resolve_backend("gather_tokens", backend, device, AUTO_ORDER, x.dtype)
    return torch.ops.maskedssl.gather_tokens(x, ids_keep, pos, name)


def scatter_tokens(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos: torch.Tensor | None = None, *, backend: str | None = None,
                   check_indices: bool | None = None) -> torch.Tensor:
    """``out[b, l] = (x_vis[b, r] if r < K else mask_token) + pos[l]``, ``r = ids_restore[b, l]``: (B, L, D).

    x_vis: (B, K, D) visible tokens in shuffled order; ids_restore: (B, L) int32/int64 in [0, L), entries
    >= K take the mask token (need not be a permutation); mask_token: (D,) (any shape with D elements, e.g.
    MAE's (1, 1, D)); pos: (L, D) or None; all of x_vis's dtype (float64 runs the torch backend).
    Differentiable in x_vis, mask_token and pos. The range check of ids_restore costs as in
    ``gather_tokens``.
    """
    check_tensor("x_vis", x_vis, ndim=3, dtypes=REFERENCE_DTYPES, what="(B, K, D)")
    b, _, d = x_vis.shape
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=INDEX_DTYPES, what="(B, L)")
    if ids_restore.shape[0] != b:
        raise ValueError(f"ids_restore must have shape ({b}, L) to match x_vis {tuple(x_vis.shape)}, "
                         f"got {tuple(ids_restore.shape)}")
    length = ids_restore.shape[1]
    check_tensor("mask_token", mask_token, dtypes=REFERENCE_DTYPES)
    if mask_token.numel() != d:
        raise ValueError(f"mask_token must hold D={d} values, got shape {tuple(mask_token.shape)}")
    if mask_token.dtype != x_vis.dtype:
        raise TypeError(f"mask_token must have x_vis's dtype {x_vis.dtype}, got {mask_token.dtype}")
    if pos is not None:
        check_tensor("pos", pos, shape=(length, d), dtypes=REFERENCE_DTYPES)
        if pos.dtype != x_vis.dtype:
            raise TypeError(f"pos must have x_vis's dtype {x_vis.dtype}, got {pos.dtype}")
    device = check_same_device(x_vis=x_vis, ids_restore=ids_restore, mask_token=mask_token, pos=pos)
    check_index_range("ids_restore", ids_restore, length, check_indices)
    name = resolve_backend("scatter_tokens", backend, device, AUTO_ORDER, x_vis.dtype)
    return torch.ops.maskedssl.scatter_tokens(x_vis, ids_restore, mask_token.reshape(d), pos, name)
