"""i-MAE (Zhang & Shen): reconstruct both images of a linear mixture from one masked encoding.

One step, as RECIPES.md fixes it:
1. ``mixed[b] = lam[b] * imgs[b] + (1 - lam[b]) * imgs[partner[b]]``; the image with weight
   ``min(lam, 1 - lam)`` is the *subordinate*, the other the *dominant* (``lam >= 0.5``: the partner is
   subordinate). ``lam`` ~ Beta(alpha, alpha) (official: alpha = 1, one value per batch; or one per sample).
2. One random mask; the encoder sees the mixture's visible patches.
3. Two disentanglement heads Linear(D -> Dd) on the whole latent (cls included): branch 0 for the
   subordinate, branch 1 for the dominant. Initialised from the teacher's ``decoder_embed`` when one is given.
4. One shared decoder runs both branches in a single call (stacked along the batch); each branch's loss is
   MAE's on the masked patches of its own unmixed image.
5. Distillation (with a teacher): a frozen vanilla MAE sees each UNMIXED image with the same mask (both
   in one batched call); each branch's head output matches ``teacher.decoder_embed(teacher.encode(.))``
   by MSE. (The official code feeds the mixture to the teacher twice; RECIPES.md fixes that.)
Loss = w_rs * rec_sub + w_rd * rec_dom + w_ds * distill_sub + w_dd * distill_dom.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from ..masking import random_masks
from ..ops import gather_tokens, mix_patchify
from ..ops._validate import INDEX_DTYPES, check_index_range, check_tensor, check_unit_interval
from .vit import MAEConfig, MaskedViT, ModelOutput, init_weights, mse


@dataclass(frozen=True)
class IMAEConfig(MAEConfig):
    """i-MAE's objective on top of MAE's. Loss weights are 1 (the paper's equal weights)."""

    rec_sub_weight: float = 1.0
    rec_dom_weight: float = 1.0
    distill_sub_weight: float = 1.0
    distill_dom_weight: float = 1.0
    lam_mode: str = "batch"  # "batch": one lam per batch (official); "sample": one per sample
    lam_alpha: float = 1.0  # lam ~ Beta(lam_alpha, lam_alpha)

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.lam_mode, str):
            raise TypeError(f"lam_mode must be 'batch' or 'sample', got {type(self.lam_mode).__name__}")
        if self.lam_mode not in ("batch", "sample"):
            raise ValueError(f"lam_mode must be 'batch' or 'sample', got {self.lam_mode!r}")
        weights = ("rec_sub_weight", "rec_dom_weight", "distill_sub_weight", "distill_dom_weight")
        for name in ("lam_alpha", *weights):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        # written so that NaN fails too (Beta(nan, nan) would raise only at the first step's draw)
        if not 0 < self.lam_alpha < math.inf:
            raise ValueError(f"lam_alpha must be positive and finite, got {self.lam_alpha}")
        for name in weights:
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be >= 0 and finite, got {getattr(self, name)}")


def random_partners(batch: int, device) -> torch.Tensor:
    """(B,) partner of each image: a random permutation with no image its own partner (B >= 2), drawn as
    one cycle through a random order (torch.randperm alone leaves about one image per batch mixed with
    itself, a sample with nothing to separate). Each image is some image's partner exactly once."""
    order = torch.randperm(batch, device=device)
    return torch.empty_like(order).scatter_(0, order, order.roll(1))


def subordinate_first(partner_is_sub: torch.Tensor, own: torch.Tensor, partner: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, (subordinate, dominant) out of the values for ``imgs[b]`` and ``imgs[partner[b]]``."""
    which = partner_is_sub.view(-1, *([1] * (own.dim() - 1)))
    return torch.where(which, partner, own), torch.where(which, own, partner)


class IMAE(MaskedViT):
    """i-MAE. ``model(imgs, partner=..., lam=...)`` -> ``ModelOutput``; partner/lam are drawn when None."""

    method = "imae"
    config_class = IMAEConfig

    def __init__(self, config: IMAEConfig | None = None, teacher: MaskedViT | None = None):
        config = IMAEConfig() if config is None else config
        super().__init__(config, with_decoder_embed=False)
        d, dd = config.arch.embed_dim, config.arch.decoder_embed_dim
        self.sub_head = nn.Linear(d, dd)
        self.dom_head = nn.Linear(d, dd)
        if teacher is not None and not isinstance(teacher, MaskedViT):
            raise TypeError(f"teacher must be an MAE model (a MaskedViT) or None, "
                            f"got {type(teacher).__name__}")
        self.teacher = teacher
        if teacher is None:
            self.sub_head.apply(init_weights)
            self.dom_head.apply(init_weights)
            return
        t = teacher.config.arch
        if teacher.decoder_embed is None or teacher.decoder_embed.out_features != dd:
            raise ValueError(f"the teacher needs a decoder_embed of width decoder_embed_dim={dd}")
        if (t.img_size, t.patch_size, t.in_chans) != (config.arch.img_size, config.arch.patch_size,
                                                      config.arch.in_chans):
            raise ValueError("the teacher must see the same images: img_size, patch_size and in_chans "
                             "must match")
        if (t.pixel_mean, t.pixel_std) != (config.arch.pixel_mean, config.arch.pixel_std):
            # its input rows are normalised with the student's statistics
            raise ValueError(f"the teacher normalises pixels with mean={t.pixel_mean}, std={t.pixel_std}; "
                             f"the student with mean={config.arch.pixel_mean}, std={config.arch.pixel_std}: "
                             "they must match")
        if teacher.decoder_embed.in_features != d:
            raise ValueError(f"the teacher's width {teacher.decoder_embed.in_features} differs from "
                             f"embed_dim={d}: its decoder_embed cannot initialise the heads")
        teacher.requires_grad_(False)
        teacher.eval()
        with torch.no_grad():
            for head in (self.sub_head, self.dom_head):
                head.weight.copy_(teacher.decoder_embed.weight)
                head.bias.copy_(teacher.decoder_embed.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: always in inference mode
        return self

    def sample_mixing(self, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A random partner permutation and lam (B,) ~ Beta(alpha, alpha), per batch or per sample."""
        partner = random_partners(batch, device)
        # no host round trip in a training step: alpha filled on the device (torch.tensor would copy it
        # from the host and wait for the stream), and no argument validation (it reads the check back);
        # the config has checked alpha > 0
        alpha = torch.full((), self.config.lam_alpha, device=device)
        draws = torch.distributions.Beta(alpha, alpha, validate_args=False).sample(
            (batch if self.config.lam_mode == "sample" else 1,))
        return partner, draws.expand(batch).contiguous()

    def _mixing(self, imgs, partner, lam):
        """(partner, lam (B,) float32): the caller's, checked here (a tensor's values with one
        device->host sync each, unless MASKEDSSL_CHECK_INDICES=0), else drawn."""
        b = imgs.shape[0]
        if partner is not None:
            check_tensor("partner", partner, shape=(b,), dtypes=INDEX_DTYPES, what="(B,) indices")
            check_index_range("partner", partner, b)
        given_lam = isinstance(lam, torch.Tensor)
        partner, lam = self._caller_mixing(imgs, partner, lam)
        if given_lam:
            check_unit_interval("lam", lam)
        return partner, lam

    def _caller_mixing(self, imgs, partner, lam):
        b = imgs.shape[0]
        if partner is None and lam is None:
            return self.sample_mixing(b, imgs.device)
        if partner is None:
            partner = random_partners(b, imgs.device)
        if lam is None:
            return partner, self.sample_mixing(b, imgs.device)[1]
        if isinstance(lam, numbers.Real) and not isinstance(lam, bool):
            if not 0.0 <= lam <= 1.0:  # checked here, without a device->host sync
                raise ValueError(f"lam must be in [0, 1], got {lam}")
            # zeros + lam, not torch.full: torch.compile keeps a Python float symbolic in arithmetic
            return partner, torch.zeros(b, device=imgs.device) + float(lam)
        if not isinstance(lam, torch.Tensor) or not lam.is_floating_point():
            what = lam.dtype if isinstance(lam, torch.Tensor) else type(lam).__name__
            raise TypeError(f"lam must be a float or a floating-point tensor, got {what}")
        if lam.dim() > 1 or (lam.dim() == 1 and lam.shape[0] not in (1, b)):
            raise ValueError(f"lam must be a float, 0-d, or of shape (1,) or (B,) = ({b},), "
                             f"got shape {tuple(lam.shape)}")
        return partner, lam.float().expand(b).contiguous()

    def forward(self, imgs: torch.Tensor, *, partner: torch.Tensor | None = None,
                lam: torch.Tensor | float | None = None, progress: float = 0.0) -> ModelOutput:
        """imgs: (B, C, H, W) float (normalised) or uint8; partner: (B,) indices into the batch; lam: the
        weight of ``imgs[b]`` in its mixture, a float or (B,) in [0, 1]. ``progress`` is unused."""
        self.check_images(imgs)
        self.check_progress(progress)
        # the masks, the pixel statistics and _mixing's partner and lam are valid: no value checks below
        partner, lam = self._mixing(imgs, partner, lam)
        masks = random_masks(imgs.shape[0], self.num_patches, self.config.mask_ratio, device=imgs.device)
        pixel = self.pixel_options(imgs)
        inputs, (own, other) = mix_patchify(imgs, self.patch_size, partner=partner, lam=lam,
                                            ids_keep=masks.ids_keep, ids_masked=masks.ids_masked,
                                            norm_pix=self.config.norm_pix_loss, check_indices=False, **pixel)
        partner_is_sub = lam >= 0.5
        target_sub, target_dom = subordinate_first(partner_is_sub, own, other)

        latent = self.encode(inputs, masks.ids_keep)
        branches = torch.cat([self.sub_head(latent), self.dom_head(latent)])  # (2B, 1+K, Dd)
        pred = self.decode(branches, masks.ids_restore.repeat(2, 1), masks.ids_masked.repeat(2, 1))
        pred_sub, pred_dom = pred.chunk(2)
        losses = {"rec_sub": mse(pred_sub, target_sub), "rec_dom": mse(pred_dom, target_dom)}

        if self.teacher is not None:
            with torch.no_grad():
                # rows = ids_keep as "targets" yields both unmixed images' visible rows: the teacher's inputs
                _, (own_rows, other_rows) = mix_patchify(imgs, self.patch_size, partner=partner, lam=lam,
                                                         ids_keep=masks.ids_keep, ids_masked=masks.ids_keep,
                                                         norm_pix=False, check_indices=False, **pixel)
                ids = masks.ids_keep.repeat(2, 1)
                rows = torch.cat([own_rows, other_rows])
                latent_t = self.teacher.decoder_embed(self.teacher.encode(rows, ids))
            distill_sub, distill_dom = subordinate_first(partner_is_sub, *latent_t.chunk(2))
            head_sub, head_dom = branches.chunk(2)
            losses["distill_sub"] = mse(head_sub, distill_sub)
            losses["distill_dom"] = mse(head_dom, distill_dom)

        c = self.config
        weights = {"rec_sub": c.rec_sub_weight, "rec_dom": c.rec_dom_weight,
                   "distill_sub": c.distill_sub_weight, "distill_dom": c.distill_dom_weight}
        loss = sum(weights[name] * value for name, value in losses.items())
        logged = {name: value.detach() for name, value in losses.items()} | {"loss": loss.detach()}
        return ModelOutput(loss, logged, masks.mask,
                           {"lam": lam, "sub_weight": torch.minimum(lam, 1 - lam), "partner": partner})

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, *, partner: torch.Tensor | None = None,
                    lam: torch.Tensor | float | None = None, progress: float = 0.0
                    ) -> dict[str, torch.Tensor]:
        """Pictures (B, C, H, W) in [0, 1]: "mixture", "masked", "sub", "dom" (the unmixed images) and
        "recon_sub", "recon_dom" (each branch's prediction at every patch)."""
        self.check_images(imgs)
        self.check_progress(progress)
        partner, lam = self._mixing(imgs, partner, lam)
        masks = random_masks(imgs.shape[0], self.num_patches, self.config.mask_ratio, device=imgs.device)
        mixture, (own, other) = mix_patchify(imgs, self.patch_size, partner=partner, lam=lam, norm_pix=False,
                                             check_indices=False, **self.pixel_options(imgs))
        sub, dom = subordinate_first(lam >= 0.5, own, other)
        latent = self.encode(gather_tokens(mixture, masks.ids_keep, check_indices=False), masks.ids_keep)
        branches = torch.cat([self.sub_head(latent), self.dom_head(latent)])
        pred = self.decode(branches, masks.ids_restore.repeat(2, 1))
        pred_sub, pred_dom = pred.chunk(2)
        return {"mixture": self.to_pixels(mixture), "masked": self.masked_pixels(mixture, masks.mask),
                "sub": self.to_pixels(sub), "dom": self.to_pixels(dom),
                "recon_sub": self.to_pixels(self.prediction_rows(pred_sub, sub)),
                "recon_dom": self.to_pixels(self.prediction_rows(pred_dom, dom))}
