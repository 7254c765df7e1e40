"""MAE, i-MAE and Self-guided MAE on the fused ops.

``build_model(method, preset, **options)`` builds one: ``method`` is "mae", "imae" or "sgmae";
``preset`` a name in ``PRESETS`` (or a ``ModelConfig``); ``options`` the method config's fields
(``MAEConfig``, ``IMAEConfig``, ``SGMAEConfig``) and any ``ModelConfig`` field overriding the preset
(img_size, in_chans, ...); i-MAE also takes ``teacher`` (an MAE, or None for no distillation).

Every model: ``model(imgs, *, partner=None, lam=None, progress=0.0) -> ModelOutput``,
``model.forward_features(imgs, pool)``, ``model.reconstruct(imgs, ...)``, ``model.config`` (the method
config; ``model.config.arch`` the architecture), ``model.method``, ``patch_size``, ``img_size``,
``in_chans``, ``num_patches``, ``mean``/``std`` (buffers, not in the state dict).

Deviations from CONTRACTS.md (small): ``model.config`` is the method's config holding the architecture
as ``.arch`` (one dataclass per concern); ``reconstruct`` also accepts ``progress`` (Self-guided MAE's
masks depend on it); i-MAE's ``lam`` is the weight of ``imgs[b]`` in [0, 1], not folded (the subordinate
is whichever image weighs less; see imae.py); ``ModelOutput.extras`` of i-MAE also holds ``partner``.
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
