"""Public ops. Each has a ``torch`` reference backend and, where built, ``triton`` and ``cuda`` kernels;
see ``maskedssl.ops._backend`` for how one is picked."""

from ._backend import available_backends, cuda_extension_loaded
from .embed_patches import embed_patches
from .mix_patchify import mix_patchify, normalize_rows
from .ncut import NCut, ncut_bipartition
from .patchify import patchify, unpatchify
from .random_masking import num_kept, random_masking
from .token_gather import gather_tokens, scatter_tokens

__all__ = [
    "NCut", "available_backends", "cuda_extension_loaded", "embed_patches", "gather_tokens", "mix_patchify",
    "ncut_bipartition", "normalize_rows", "num_kept", "patchify", "random_masking", "scatter_tokens",
    "unpatchify",
]
