"""Self-guided MAE (Shin et al., 2024): MAE whose masks, after a warm-up, come from its own patch clustering.

While ``progress < warmup_frac`` the masks are MAE's random ones. Afterwards each step first runs a
no-grad pass over all patches up to layer ``sg_layer``, bi-partitions those features with a normalized cut
and masks the most object-like patches first, with a few hint tokens left visible
(``maskedssl.masking.InformedMasking``). Everything after the mask is MAE's step unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masking import InformedMasking, Masks
from ..ops._validate import check_probability
from ..ops.ncut import check_graph_args
from .mae import MAE
from .vit import MAEConfig


@dataclass(frozen=True)
class SGMAEConfig(MAEConfig):
    """Self-guided MAE's options on top of MAE's.

    warmup_frac: fraction of training with random masks (the paper's default: 10% of the epochs);
    sg_layer: which hidden state gives the features (0: the patch embeddings, i: after block i, -1: the
    last block; the paper finds early layers about as good, and they are cheaper);
    hint_ratio: fraction of the would-be-masked foreground patches left visible (our default 0.05);
    tau: None for the clamped-cosine affinity, else TokenCut's binary graph threshold (TokenCut: 0.2);
    eps: the affinity floor;
    center_features: subtract each sample's mean patch feature before the cut (our choice, default on;
    see ``maskedssl.masking.InformedMasking``; False cuts the features as they are, the recipe's graph).
    """

    warmup_frac: float = 0.1
    sg_layer: int = -1
    hint_ratio: float = 0.05
    tau: float | None = None
    eps: float = 1e-5
    center_features: bool = True

    def __post_init__(self):
        super().__post_init__()
        for name, types, what in (("warmup_frac", (int, float), "a float"), ("sg_layer", int, "an int"),
                                  ("center_features", bool, "a bool")):
            value = getattr(self, name)
            if (isinstance(value, bool) and name != "center_features") or not isinstance(value, types):
                raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
        if not 0.0 <= self.warmup_frac <= 1.0:
            raise ValueError(f"warmup_frac must be in [0, 1], got {self.warmup_frac}")
        # as InformedMasking checks them, but when the config is made rather than when a model is built
        check_probability("hint_ratio", self.hint_ratio)
        check_graph_args(self.tau, self.eps)
        depth = self.arch.depth
        if not -depth - 1 <= self.sg_layer <= depth:
            raise ValueError(f"sg_layer must be in [{-depth - 1}, {depth}] for depth {depth}, "
                             f"got {self.sg_layer}")


class SelfGuidedMAE(MAE):
    """MAE with informed masks once ``progress >= warmup_frac``."""

    method = "sgmae"
    config_class = SGMAEConfig

    def __init__(self, config: SGMAEConfig | None = None):
        config = SGMAEConfig() if config is None else config
        super().__init__(config)
        self.informed_masking = InformedMasking(config.mask_ratio, config.hint_ratio, config.tau, config.eps,
                                                config.center_features)

    def make_masks(self, imgs: torch.Tensor, progress: float) -> tuple[Masks, dict]:
        if progress < self.config.warmup_frac:
            masks, _ = super().make_masks(imgs, progress)
            return masks, {"informed": False}
        with torch.no_grad():
            feats = self.hidden_state(self.patch_rows(imgs), self.config.sg_layer)
        informed = self.informed_masking(feats)
        return informed.masks, {"informed": True, "ncut": informed.ncut, "hints": informed.hints}
