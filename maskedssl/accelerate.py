"""``accelerate(model)``: drop-in fused ops for an existing facebookresearch/mae ``MaskedAutoencoderViT``.

The instance keeps its weights, its interface and its class name; it becomes an instance of a subclass of
its class (made once per class) whose methods compute the same values through ``maskedssl.ops``. Methods
live on that class, not on the instance, so copies, DataParallel replicas and pickles behave as the
original's (a pickle loads back accelerated):
- ``forward(imgs, mask_ratio)`` -> ``(loss, pred, mask)``: one ``mix_patchify`` call gives the kept input
  rows and the masked target rows; the patch projection runs on the kept rows only; ``scatter_tokens``
  builds the decoder input (mask tokens, unshuffle, position add) in one pass; the loss reads the masked
  rows only. The mask comes from the same ``torch.rand(B, L)`` call, so a seeded run picks the same mask.
- ``forward_encoder``, ``forward_decoder``, ``random_masking``, ``patchify`` keep their signatures and
  return values, for code that calls them one by one; ``forward_loss`` is left as it is.

A model whose class overrides some of these methods and not the others (e.g. its own ``forward_loss`` or
masking on top of the official model) is refused: the fused ``forward`` would silently bypass them. The
fused forward takes images that need no gradient (the official one also gives a gradient for the images:
with ``imgs.requires_grad`` the unfused ops run). ``patch_embed``'s hooks do not run in the fused path.
"""

from __future__ import annotations

import math

import torch

from .masking import Masks, random_masks
from .ops import embed_patches, gather_tokens, mix_patchify, normalize_rows, patchify, scatter_tokens

REQUIRED = ("patchify", "random_masking", "forward_encoder", "forward_decoder", "forward_loss", "patch_embed",
            "pos_embed", "cls_token", "blocks", "norm", "decoder_embed", "mask_token", "decoder_pos_embed",
            "decoder_blocks", "decoder_norm", "decoder_pred", "norm_pix_loss")


def _patch_size(model) -> int:
    size = model.patch_embed.patch_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def _check_images(model, imgs: torch.Tensor) -> None:
    """The official forward asserts the input size in ``patch_embed``, which the fused path skips: another
    size would patchify to another grid whose rows the masks still index in range, silently."""
    if not isinstance(imgs, torch.Tensor):
        raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
    if not imgs.is_floating_point():  # the official patch projection refuses uint8 too
        raise TypeError(f"imgs must be floating point (normalised), got {imgs.dtype}")
    size = getattr(model.patch_embed, "img_size", None)
    if size is None:  # a dynamic-size PatchEmbed: the square grid of the position embedding
        size = math.isqrt(model.pos_embed.shape[1] - 1) * _patch_size(model)
    height, width = size if isinstance(size, (tuple, list)) else (size, size)
    expected = (model.patch_embed.proj.weight.shape[1], height, width)
    if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
        raise ValueError(f"imgs must be (B, {', '.join(map(str, expected))}) for this model, "
                         f"got shape {tuple(imgs.shape)}")


def _masks(model, imgs: torch.Tensor, mask_ratio: float) -> Masks:
    if isinstance(mask_ratio, torch.Tensor) and mask_ratio.numel() == 1:  # the official code takes one too
        mask_ratio = float(mask_ratio)
    return random_masks(imgs.shape[0], model.pos_embed.shape[1] - 1, mask_ratio, device=imgs.device)


def _encode(model, rows: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Kept patch rows -> latent (B, 1+K, D), as the official encoder after its masking step."""
    proj = model.patch_embed.proj
    x = embed_patches(rows, proj.weight, proj.bias)
    norm = getattr(model.patch_embed, "norm", None)  # timm 0.3.2's PatchEmbed (official MAE's) has none
    if norm is not None:
        x = norm(x)
    x = x + model.pos_embed[0, 1:].to(x.dtype)[ids_keep]
    cls = (model.cls_token + model.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for block in model.blocks:
        x = block(x)
    return model.norm(x)


def _decode(model, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Latent -> predictions (B, L, p*p*C) for every patch, as the official decoder."""
    x = model.decoder_embed(latent)
    b = x.shape[0]
    # cls joins as visible slot 0 at position 0: one scatter call, no concatenation
    restore = torch.cat([ids_restore.new_zeros(b, 1), ids_restore + 1], dim=1)
    # (the masks are random_masks', valid by construction: no range checks, each a device->host sync)
    x = scatter_tokens(x, restore, model.mask_token.to(x.dtype), model.decoder_pos_embed[0].to(x.dtype),
                       check_indices=False)
    for block in model.decoder_blocks:
        x = block(x)
    return model.decoder_pred(model.decoder_norm(x))[:, 1:]


def _forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75):
    # imported here: models/ pulls in timm, which `import maskedssl.ops` should not pay for
    from .models.vit import mse

    _check_images(self, imgs)
    masks = _masks(self, imgs, mask_ratio)
    if imgs.requires_grad:  # mix_patchify has no gradient: the same rows and targets from autograd ops
        patches = patchify(imgs, _patch_size(self))
        rows = gather_tokens(patches, masks.ids_keep, check_indices=False)
        rows = rows.to(self.patch_embed.proj.weight.dtype)
        target = gather_tokens(patches, masks.ids_masked, check_indices=False)
        target = (normalize_rows(target) if self.norm_pix_loss else target).to(rows.dtype)
    else:
        rows, (target,) = mix_patchify(imgs, _patch_size(self), ids_keep=masks.ids_keep,
                                       ids_masked=masks.ids_masked, norm_pix=bool(self.norm_pix_loss),
                                       out_dtype=self.patch_embed.proj.weight.dtype, check_indices=False)
    pred = _decode(self, _encode(self, rows, masks.ids_keep), masks.ids_restore)
    loss = mse(gather_tokens(pred, masks.ids_masked, check_indices=False), target)
    return loss, pred, masks.mask


def _forward_encoder(self, imgs: torch.Tensor, mask_ratio: float):
    _check_images(self, imgs)
    masks = _masks(self, imgs, mask_ratio)
    rows = gather_tokens(patchify(imgs, _patch_size(self)), masks.ids_keep, check_indices=False)
    rows = rows.to(self.patch_embed.proj.weight.dtype)
    return _encode(self, rows, masks.ids_keep), masks.mask, masks.ids_restore


def _forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor):
    return _decode(self, x, ids_restore)


def _random_masking(self, x: torch.Tensor, mask_ratio: float):
    masks = random_masks(x.shape[0], x.shape[1], mask_ratio, device=x.device)
    return gather_tokens(x, masks.ids_keep, check_indices=False), masks.mask, masks.ids_restore


def _patchify(self, imgs: torch.Tensor):
    return patchify(imgs, _patch_size(self))


FUSED = {"forward": _forward, "forward_encoder": _forward_encoder, "forward_decoder": _forward_decoder,
         "random_masking": _random_masking, "patchify": _patchify}
_ACCELERATED: dict[type, type] = {}  # original class -> its accelerated subclass


def _new_accelerated(base: type):
    """Unpickling: an empty instance of ``base``'s accelerated class (its state is set after)."""
    cls = _accelerated_class(base)
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    # pickled as the original class's state, rebuilt as an accelerated instance
    return _new_accelerated, (type(self).__bases__[0],), self.__getstate__()


def _accelerated_class(base: type) -> type:
    if base not in _ACCELERATED:
        namespace = dict(FUSED, __reduce_ex__=_reduce_ex, __module__=base.__module__,
                         __qualname__=base.__qualname__, _maskedssl_accelerated=True)
        _ACCELERATED[base] = type(base.__name__, (base,), namespace)
    return _ACCELERATED[base]


def _check_layout(model) -> None:
    """The fused path reads the patch grid from the position embeddings: they must cover exactly the
    patch_embed's patches plus the cls slot, or it would run on another number of patches, silently."""
    if not isinstance(getattr(model.patch_embed, "proj", None), torch.nn.Conv2d):
        raise TypeError("accelerate() needs patch_embed.proj to be the Conv2d patch projection")
    # the official forward calls the other methods: a class that overrides only some of them (its own
    # loss or masking on top of the official model) would have them bypassed by the fused forward
    methods = (*FUSED, "forward_loss")
    owners = {name: next(c for c in type(model).__mro__ if name in vars(c)) for name in methods}
    if len(set(owners.values())) > 1:
        where = {name: c.__qualname__ for name, c in owners.items()}
        raise TypeError(f"accelerate() replaces {sorted(FUSED)} of an official-style model, but "
                        f"{type(model).__name__} defines them in different classes ({where}): the fused "
                        f"forward would bypass the overrides")
    length = getattr(model.patch_embed, "num_patches", None)
    if length is None:
        length = model.pos_embed.shape[1] - 1
    for name in ("pos_embed", "decoder_pos_embed"):
        pos = getattr(model, name)
        if not isinstance(pos, torch.Tensor) or pos.dim() != 3 or pos.shape[:2] != (1, length + 1):
            got = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
            raise ValueError(f"accelerate() needs {name} of shape (1, 1 + L, D) with L = {length} patches "
                             f"and a cls slot first, got {got}")


def accelerate(model: torch.nn.Module) -> torch.nn.Module:
    """Route an MAE-style ``MaskedAutoencoderViT`` instance through the fused ops; returns the same object
    (a second call changes nothing)."""
    if getattr(type(model), "_maskedssl_accelerated", False):
        return model
    missing = [name for name in REQUIRED if not hasattr(model, name)]
    if missing:
        raise TypeError(f"accelerate() needs a facebookresearch/mae-style MaskedAutoencoderViT; "
                        f"{type(model).__name__} lacks {missing}")
    if any(name in vars(model) for name in FUSED):
        raise TypeError(f"accelerate() replaces the methods {sorted(FUSED)}, but this instance has its own "
                        f"{sorted(name for name in FUSED if name in vars(model))}")
    _check_layout(model)
    model.__class__ = _accelerated_class(type(model))
    return model


__all__ = ["accelerate"]
