"""``gather_tokens`` (encoder: keep visible tokens, add their position embedding) and ``scatter_tokens``
(decoder: put visible tokens back in place, fill the rest with the mask token, add position embeddings).

Each is one ``torch.library.custom_op`` taking the resolved backend as a string, with a fake
implementation for tracing and autograd registered outside the kernels; the backward is a custom op too.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_same_device, check_tensor

AUTO_ORDER = ("cuda", "triton", "torch")


def _deterministic(deterministic: bool | None) -> bool:
    return torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)


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
    grad_x = grad.new_zeros(b, length, d).scatter_add_(1, ids, grad)
    grad_pos = grad_x.sum(0, dtype=torch.float32).to(grad.dtype) if need_pos else grad.new_empty(0)
    return grad_x, grad_pos


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
    ids = ids_restore.long().clamp(max=num_visible).unsqueeze(-1).expand(-1, -1, d)
    padded = grad.new_zeros(b, num_visible + 1, d).scatter_add_(1, ids, grad)
    grad_x_vis = padded[:, :num_visible].contiguous()
    masked = (ids_restore >= num_visible).unsqueeze(-1)
    grad_mask = torch.where(masked, grad, 0).sum((0, 1), dtype=torch.float32).to(grad.dtype)
    grad_pos = grad.sum(0, dtype=torch.float32).to(grad.dtype) if need_pos else grad.new_empty(0)
    return grad_x_vis, grad_mask, grad_pos


# ----------------------------------------------------------------------------- registered ops
@torch.library.custom_op("maskedssl::gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None,
                      backend: str) -> torch.Tensor:
    return _gather_tokens_torch(x, ids_keep, pos)


@_gather_tokens_op.register_fake
def _(x, ids_keep, pos, backend):
    return x.new_empty(x.shape[0], ids_keep.shape[1], x.shape[2])


@torch.library.custom_op("maskedssl::gather_tokens_backward", mutates_args=())
def _gather_tokens_backward_op(grad: torch.Tensor, ids_keep: torch.Tensor, length: int, need_pos: bool,
                               deterministic: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _gather_tokens_backward_torch(grad, ids_keep, length, need_pos)


@_gather_tokens_backward_op.register_fake
def _(grad, ids_keep, length, need_pos, deterministic, backend):
    b, _, d = grad.shape
    return grad.new_empty(b, length, d), grad.new_empty((length, d) if need_pos else (0,))


def _gather_setup_context(ctx, inputs, output):
    x, ids_keep, pos, backend = inputs
    ctx.save_for_backward(ids_keep)
    ctx.length = x.shape[1]
    ctx.has_pos = pos is not None
    ctx.backend = backend
    ctx.deterministic = _deterministic(None)


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
    return _scatter_tokens_torch(x_vis, ids_restore, mask_token, pos)


@_scatter_tokens_op.register_fake
def _(x_vis, ids_restore, mask_token, pos, backend):
    return x_vis.new_empty(x_vis.shape[0], ids_restore.shape[1], x_vis.shape[2])


@torch.library.custom_op("maskedssl::scatter_tokens_backward", mutates_args=())
def _scatter_tokens_backward_op(grad: torch.Tensor, ids_restore: torch.Tensor, num_visible: int,
                                need_pos: bool, deterministic: bool, backend: str
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _scatter_tokens_backward_torch(grad, ids_restore, num_visible, need_pos)


@_scatter_tokens_backward_op.register_fake
def _(grad, ids_restore, num_visible, need_pos, deterministic, backend):
    b, length, d = grad.shape
    return (grad.new_empty(b, num_visible, d), grad.new_empty(d),
            grad.new_empty((length, d) if need_pos else (0,)))


def _scatter_setup_context(ctx, inputs, output):
    x_vis, ids_restore, mask_token, pos, backend = inputs
    ctx.save_for_backward(ids_restore)
    ctx.num_visible = x_vis.shape[1]
    ctx.has_pos = pos is not None
    ctx.backend = backend
    ctx.deterministic = _deterministic(None)


def _scatter_backward(ctx, grad):
    (ids_restore,) = ctx.saved_tensors
    need_pos = ctx.has_pos and ctx.needs_input_grad[3]
    grad_x_vis, grad_mask, grad_pos = torch.ops.maskedssl.scatter_tokens_backward(
        grad.contiguous(), ids_restore, ctx.num_visible, need_pos, ctx.deterministic, ctx.backend)
    return grad_x_vis, None, grad_mask, grad_pos if need_pos else None, None


_scatter_tokens_op.register_autograd(_scatter_backward, setup_context=_scatter_setup_context)


# ----------------------------------------------------------------------------- public API
def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None = None, *,
                  backend: str | None = None) -> torch.Tensor:
    """``out[b, k] = x[b, ids_keep[b, k]] + pos[ids_keep[b, k]]`` -> (B, K, D).

    x: (B, L, D) float32/bfloat16/float16; ids_keep: (B, K) int32/int64 in [0, L) (repeats allowed);
    pos: (L, D) of x's dtype, or None. Differentiable in x and pos.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES, what="(B, L, D)")
    b, length, d = x.shape
    check_tensor("ids_keep", ids_keep, ndim=2, dtypes=INDEX_DTYPES, what="(B, K)")
    if ids_keep.shape[0] != b:
        raise ValueError(f"ids_keep must have shape ({b}, K) to match x {tuple(x.shape)}, "
                         f"got {tuple(ids_keep.shape)}")
    if pos is not None:
        check_tensor("pos", pos, shape=(length, d), dtypes=FLOAT_DTYPES)
        if pos.dtype != x.dtype:
            raise TypeError(f"pos must have x's dtype {x.dtype}, got {pos.dtype}")
    device = check_same_device(x=x, ids_keep=ids_keep, pos=pos)
    check_index_range("ids_keep", ids_keep, length)
    name = resolve_backend("gather_tokens", backend, device, AUTO_ORDER)
    return torch.ops.maskedssl.gather_tokens(x, ids_keep, pos, name)


def scatter_tokens(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                   pos: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """``out[b, l] = (x_vis[b, r] if r < K else mask_token) + pos[l]``, ``r = ids_restore[b, l]`` -> (B, L, D).

    x_vis: (B, K, D) visible tokens in shuffled order; ids_restore: (B, L) int32/int64 in [0, L);
    mask_token: (D,) (any shape with D elements, e.g. MAE's (1, 1, D)); pos: (L, D) or None; all of
    x_vis's dtype. Differentiable in x_vis, mask_token and pos.
    """
    check_tensor("x_vis", x_vis, ndim=3, dtypes=FLOAT_DTYPES, what="(B, K, D)")
    b, _, d = x_vis.shape
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=INDEX_DTYPES, what="(B, L)")
    if ids_restore.shape[0] != b:
        raise ValueError(f"ids_restore must have shape ({b}, L) to match x_vis {tuple(x_vis.shape)}, "
                         f"got {tuple(ids_restore.shape)}")
    length = ids_restore.shape[1]
    check_tensor("mask_token", mask_token, dtypes=FLOAT_DTYPES)
    if mask_token.numel() != d:
        raise ValueError(f"mask_token must hold D={d} values, got shape {tuple(mask_token.shape)}")
    if mask_token.dtype != x_vis.dtype:
        raise TypeError(f"mask_token must have x_vis's dtype {x_vis.dtype}, got {mask_token.dtype}")
    if pos is not None:
        check_tensor("pos", pos, shape=(length, d), dtypes=FLOAT_DTYPES)
        if pos.dtype != x_vis.dtype:
            raise TypeError(f"pos must have x_vis's dtype {x_vis.dtype}, got {pos.dtype}")
    device = check_same_device(x_vis=x_vis, ids_restore=ids_restore, mask_token=mask_token, pos=pos)
    check_index_range("ids_restore", ids_restore, length)
    name = resolve_backend("scatter_tokens", backend, device, AUTO_ORDER)
    return torch.ops.maskedssl.scatter_tokens(x_vis, ids_restore, mask_token.reshape(d), pos, name)
