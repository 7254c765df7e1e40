"""maskedssl: fused kernels and compact trainers for masked-image-modeling pretraining."""

from . import ops
from .accelerate import accelerate

__version__ = "0.1.0"
__all__ = ["accelerate", "ops"]
