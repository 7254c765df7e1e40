"""``accelerate(model)``: drop-in fused ops for an existing facebookresearch/mae ``MaskedAutoencoderViT``.

The instance keeps its weights and its interface; its methods are replaced (on the instance only) by
versions that compute the same values through ``maskedssl.ops``:
- ``forward(imgs, mask_ratio)`` -> ``(loss, pred, mask)``: one ``mix_patchify`` call gives the kept input
  rows and the masked target rows; the patch projection runs on the kept rows only; ``scatter_tokens``
  builds the decoder input (mask tokens, unshuffle, position add) in one pass; the loss reads the masked
  rows only. The mask comes from the same ``torch.rand(B, L)`` call, so a seeded run picks the same mask.
- ``forward_encoder``, ``forward_decoder``, ``random_masking``, ``patchify`` keep their signatures and
  return values, for code that calls them one by one; ``forward_loss`` is left as it is.
"""

from __future__ import annotations

import math
import types

import torch

from .masking import Masks, random_masks
from .ops import embed_patches, gather_tokens, mix_patchify, patchify, scatter_tokens

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
    size = getattr(model.patch_embed, "img_size", None)
    if size is None:  # a dynamic-size PatchEmbed: the square grid of the position embedding
        size = math.isqrt(model.pos_embed.shape[1] - 1) * _patch_size(model)
    height, width = size if isinstance(size, (tuple, list)) else (size, size)
    expected = (model.patch_embed.proj.weight.shape[1], height, width)
    if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
        raise ValueError(f"imgs must be (B, {', '.join(map(str, expected))}) for this model, "
                         f"got shape {tuple(imgs.shape)}")


def _masks(model, imgs: torch.Tensor, mask_ratio: float) -> Masks:
    return random_masks(imgs.shape[0], model.pos_embed.shape[1] - 1, mask_ratio, device=imgs.device)


def _encode(model, rows: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Kept patch rows -> latent (B, 1+K, D), as the official encoder after its masking step."""
    proj = model.patch_embed.proj
    x = model.patch_embed.norm(embed_patches(rows, proj.weight, proj.bias))
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
    x = scatter_tokens(x, restore, model.mask_token.to(x.dtype), model.decoder_pos_embed[0].to(x.dtype))
    for block in model.decoder_blocks:
        x = block(x)
    return model.decoder_pred(model.decoder_norm(x))[:, 1:]


def _forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75):
    # imported here: models/ pulls in timm, which `import maskedssl.ops` should not pay for
    from .models.vit import mse

    _check_images(self, imgs)
    masks = _masks(self, imgs, mask_ratio)
    rows, (target,) = mix_patchify(imgs, _patch_size(self), ids_keep=masks.ids_keep,
                                   ids_masked=masks.ids_masked, norm_pix=bool(self.norm_pix_loss),
                                   out_dtype=self.patch_embed.proj.weight.dtype)
    pred = _decode(self, _encode(self, rows, masks.ids_keep), masks.ids_restore)
    loss = mse(gather_tokens(pred, masks.ids_masked), target)
    return loss, pred, masks.mask


def _forward_encoder(self, imgs: torch.Tensor, mask_ratio: float):
    _check_images(self, imgs)
    masks = _masks(self, imgs, mask_ratio)
    rows = gather_tokens(patchify(imgs, _patch_size(self)), masks.ids_keep)
    rows = rows.to(self.patch_embed.proj.weight.dtype)
    return _encode(self, rows, masks.ids_keep), masks.mask, masks.ids_restore


def _forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor):
    return _decode(self, x, ids_restore)


def _random_masking(self, x: torch.Tensor, mask_ratio: float):
    masks = random_masks(x.shape[0], x.shape[1], mask_ratio, device=x.device)
    return gather_tokens(x, masks.ids_keep), masks.mask, masks.ids_restore


def _patchify(self, imgs: torch.Tensor):
    return patchify(imgs, _patch_size(self))


def accelerate(model: torch.nn.Module) -> torch.nn.Module:
    """Route an MAE-style ``MaskedAutoencoderViT`` instance through the fused ops; returns the same object."""
    missing = [name for name in REQUIRED if not hasattr(model, name)]
    if missing:
        raise TypeError(f"accelerate() needs a facebookresearch/mae-style MaskedAutoencoderViT; "
                        f"{type(model).__name__} lacks {missing}")
    if not isinstance(getattr(model.patch_embed, "proj", None), torch.nn.Conv2d):
        raise TypeError("accelerate() needs patch_embed.proj to be the Conv2d patch projection")
    for name, fn in (("forward", _forward), ("forward_encoder", _forward_encoder),
                     ("forward_decoder", _forward_decoder), ("random_masking", _random_masking),
                     ("patchify", _patchify)):
        setattr(model, name, types.MethodType(fn, model))
    return model


__all__ = ["accelerate"]
