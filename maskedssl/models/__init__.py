"""MAE, i-MAE and Self-guided MAE on the fused ops.

``build_model(method, preset="micro", **options)``: ``method`` is "mae", "imae" or "sgmae"; ``preset``
a name in ``PRESETS`` (vit_tiny, vit_small, vit_base, vit_large: 224 px patch 16; cifar_tiny, cifar_small:
32 px patch 4; cifar_tiny_p2, cifar_small_p2: 32 px patch 2; tiny_imagenet: 64 px patch 8; micro: 32 px
patch 4, width 96, depth 4, decoder 64 x 2) or a ``ModelConfig``; ``options`` are the method config's
fields (``MAEConfig``: mask_ratio, norm_pix_loss; ``IMAEConfig``: + rec_sub_weight, rec_dom_weight,
distill_sub_weight, distill_dom_weight, lam_mode, lam_alpha; ``SGMAEConfig``: + warmup_frac, sg_layer,
hint_ratio, tau, eps, center_features) and any ``ModelConfig`` field overriding the preset (img_size,
in_chans, depth, ...); i-MAE also takes ``teacher`` (an MAE; None: no distillation). Unknown options raise
TypeError.

Every model: ``model(imgs, *, partner=None, lam=None, progress=0.0) -> ModelOutput(loss, losses, mask,
extras)``; ``forward_features(imgs, pool=None|"cls"|"mean")``; ``reconstruct(imgs, *, partner=None,
lam=None, progress=0.0)`` -> pictures in [0, 1]; ``config`` (the method config, ``config.arch`` the
architecture), ``method``, ``patch_size``, ``img_size``, ``in_chans``, ``num_patches``, ``mean``/``std``
(non-persistent buffers); building blocks ``patch_rows``, ``encode``, ``hidden_state``, ``decode``,
``to_pixels``. ``MAE.from_official(path, preset=None, *, strict=True, **options)`` loads a
facebookresearch/mae checkpoint.

Notes: ``model.config`` is the method's config holding the architecture as ``.arch`` (one dataclass per
concern); ``reconstruct`` also accepts ``progress`` (Self-guided MAE's masks depend on it); i-MAE's ``lam``
is the weight of ``imgs[b]`` in [0, 1], drawn from Beta(alpha, alpha) without folding: the subordinate is
whichever image weighs less (see imae.py); i-MAE's extras also hold ``partner``, Self-guided MAE's
``hints``.
"""

from __future__ import annotations

from .imae import IMAE, IMAEConfig
from .mae import MAE
from .sgmae import SelfGuidedMAE, SGMAEConfig
from .vit import PRESETS, MAEConfig, MaskedViT, ModelConfig, ModelOutput, make_config

METHODS = {"mae": MAE, "imae": IMAE, "sgmae": SelfGuidedMAE}


def build_model(method: str, preset: str | ModelConfig = "micro", **options) -> MaskedViT:
    """A fresh model of ``method`` ("mae" | "imae" | "sgmae") at ``preset``, with ``options``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[method]
    if method == "imae":
        teacher = options.pop("teacher", None)
        return cls(make_config(cls.config_class, preset, **options), teacher=teacher)
    return cls(make_config(cls.config_class, preset, **options))


__all__ = [
    "IMAE", "IMAEConfig", "MAE", "MAEConfig", "METHODS", "MaskedViT", "ModelConfig", "ModelOutput", "PRESETS",
    "SGMAEConfig", "SelfGuidedMAE", "build_model",
]
