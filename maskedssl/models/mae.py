"""MAE (He et al., 2022) on the fused ops; parameter names as facebookresearch/mae, so its checkpoints load.

Differences from ``models_mae.py`` that leave the numbers unchanged (to float rounding):
- the patch projection runs on the kept patches only, after masking (the official code embeds every
  patch and then drops three quarters of them);
- the prediction head runs on the masked tokens only, which are all the loss looks at; the mean over
  them equals the official ``(loss * mask).sum() / mask.sum()``.
"""

from __future__ import annotations

import os
import re

import torch

from ..masking import Masks, random_masks
from ..ops import gather_tokens, mix_patchify
from .vit import PRESETS, MAEConfig, MaskedViT, ModelOutput, make_config, mse


def refused_objects(err: Exception) -> str | None:
    """One line on what ``torch.load(weights_only=True)`` refused in a checkpoint (a Python object that only
    running its pickled code could rebuild), or None when ``err`` is another failure."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if found is None:
        return None
    return (f"it holds a {found.group(1)} object, which loading without running the file's code refuses "
            "(a facebookresearch/mae training checkpoint keeps its options so, under 'args'): save its "
            "'model' entry alone, from a trusted copy")


class MAE(MaskedViT):
    """Masked autoencoder. ``model(imgs)`` -> ``ModelOutput`` with the MSE on masked patches."""

    method = "mae"
    config_class = MAEConfig

    def __init__(self, config: MAEConfig | None = None):
        super().__init__(MAEConfig() if config is None else config)

    def make_masks(self, imgs: torch.Tensor, progress: float) -> tuple[Masks, dict]:
        """The masks of one step and what to log about them; random for MAE."""
        masks = random_masks(imgs.shape[0], self.num_patches, self.config.mask_ratio, device=imgs.device)
        return masks, {}

    def forward(self, imgs: torch.Tensor, *, partner=None, lam=None, progress: float = 0.0) -> ModelOutput:
        """imgs: (B, C, H, W) float (normalised) or uint8. ``partner``/``lam`` are i-MAE's and must be None;
        ``progress`` (fraction of training done) matters to Self-guided MAE only."""
        if partner is not None or lam is not None:
            raise ValueError(f"{type(self).__name__} does not mix images: partner and lam must be None")
        self.check_images(imgs)
        self.check_progress(progress)
        masks, extras = self.make_masks(imgs, progress)
        inputs, (target,) = mix_patchify(imgs, self.patch_size, ids_keep=masks.ids_keep,
                                         ids_masked=masks.ids_masked, norm_pix=self.config.norm_pix_loss,
                                         check_indices=False, **self.pixel_options(imgs))
        latent = self.encode(inputs, masks.ids_keep)
        pred = self.decode(self.decoder_embed(latent), masks.ids_restore, masks.ids_masked)
        loss = mse(pred, target)
        return ModelOutput(loss, {"loss": loss.detach()}, masks.mask, extras)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, *, partner=None, lam=None, progress: float = 0.0
                    ) -> dict[str, torch.Tensor]:
        """Pictures (B, C, H, W) in [0, 1]: "input", "masked" (masked patches grey) and "reconstruction"
        (visible patches from the input, masked ones predicted)."""
        if partner is not None or lam is not None:
            raise ValueError(f"{type(self).__name__} does not mix images: partner and lam must be None")
        self.check_images(imgs)
        self.check_progress(progress)
        masks, _ = self.make_masks(imgs, progress)
        rows = self.patch_rows(imgs)
        latent = self.encode(gather_tokens(rows, masks.ids_keep, check_indices=False), masks.ids_keep)
        pred = self.prediction_rows(self.decode(self.decoder_embed(latent), masks.ids_restore), rows)
        mixed = torch.where(masks.mask[..., None] > 0, pred, rows.float())
        return {"input": self.to_pixels(rows), "masked": self.masked_pixels(rows, masks.mask),
                "reconstruction": self.to_pixels(mixed)}

    @classmethod
    def from_official(cls, path: str | os.PathLike, preset: str | None = None, *, strict: bool = True,
                      **options) -> MAE:
        """Load a facebookresearch/mae checkpoint (its ``model`` entry when present).

        ``preset`` names the architecture; None picks the preset whose shapes match the checkpoint
        (vit_base / vit_large for the official ones). ``options`` are MAEConfig fields (mask_ratio,
        norm_pix_loss) or ModelConfig overrides. ``strict=False`` accepts missing keys (the encoder-only
        pre-trained releases have no decoder), which stay at their initial values.
        """
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # pickle/zip/format errors: say which file and why
            refused = refused_objects(err)
            if refused is not None:
                raise ValueError(f"{path} cannot be loaded: {refused}") from None
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path} holds no state dict of tensors (expected one, or one under 'model')")
        if preset is None:
            preset = _matching_preset(state, path)
        model = cls(make_config(cls.config_class, preset, **options))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if unexpected or wrong_shape or (missing and strict):
            problems = [f"{what} {_listing(keys)}" for what, keys in (
                ("missing keys", missing), ("unexpected keys", unexpected),
                ("wrong shapes", [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
                                  for k in wrong_shape])) if keys]
            raise ValueError(f"{path} does not match MAE preset {preset!r}: " + "; ".join(problems))
        model.load_state_dict(state, strict=False)
        return model


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}, ... {len(items) - limit} more]" if len(items) > limit else f"[{shown}]"


def _matching_preset(state: dict, path) -> str:
    """The preset with the checkpoint's shapes (head counts are not visible in weights: presets fix them).
    Encoder-only checkpoints are matched on the encoder alone."""
    try:
        proj = state["patch_embed.proj.weight"]
        grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
        found = {"embed_dim": state["cls_token"].shape[-1], "patch_size": proj.shape[-1],
                 "in_chans": proj.shape[1], "img_size": grid * proj.shape[-1]}
    except KeyError as err:
        raise ValueError(f"{path} is not an MAE checkpoint: no {err.args[0]!r}; pass preset= to see "
                         "every missing and unexpected key") from err
    for name, prefix in (("depth", "blocks."), ("decoder_depth", "decoder_blocks.")):
        layers = {k.split(".")[1] for k in state if k.startswith(prefix)}
        if layers:
            found[name] = len(layers)
    if "mask_token" in state:
        found["decoder_embed_dim"] = state["mask_token"].shape[-1]
    for name, arch in PRESETS.items():
        if all(getattr(arch, key) == value for key, value in found.items()):
            return name
    raise ValueError(f"{path}: no preset has the checkpoint's shapes {found}; pass preset= (a name or a "
                     "ModelConfig)")
