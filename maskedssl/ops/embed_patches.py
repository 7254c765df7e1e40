"""``embed_patches``: the ViT patch embedding applied to patch rows instead of the image.

A ``Conv2d(C, D, kernel_size=p, stride=p)`` on an image is a GEMM on its patches. With the rows that
``mix_patchify`` emits (channel innermost, ``(py, px, c)``), the conv weight (D, C, p, p) viewed as
(D, p*p*C) in that same order gives the same numbers as the conv on those patches. Run on the kept rows
only, it costs 1 - mask_ratio of embedding every patch (4x fewer FLOPs at mask 0.75), and the weight keeps
its Conv2d shape, so ``patch_embed.proj.weight`` of MAE/timm checkpoints loads unchanged.

Plain ``F.linear``: differentiable in all three arguments and traceable by ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import FLOAT_DTYPES, check_same_device, check_tensor

DTYPES = (*FLOAT_DTYPES, torch.float64)  # float64 for gradcheck


def _autocast_enabled(device_type: str) -> bool:
    # is_autocast_enabled raises for a device type without autocast (meta). torch 2.11's dynamo cannot trace
    # is_autocast_available (a graph break under fullgraph); the devices it compiles for all have autocast.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def embed_patches(inputs: torch.Tensor, proj_weight: torch.Tensor,
                  proj_bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, p*p*C) patch rows -> (B, K, D) tokens, with ``proj_weight`` the (D, C, p, p) Conv2d weight
    and ``proj_bias`` its (D,) bias, all of one dtype (under autocast, any of float32/bfloat16/float16)."""
    check_tensor("inputs", inputs, ndim=3, dtypes=DTYPES, what="(B, K, p*p*C)")
    check_tensor("proj_weight", proj_weight, ndim=4, dtypes=DTYPES, what="(D, C, p, p)")
    d, c, p, q = proj_weight.shape
    if p != q or p == 0 or c == 0:
        raise ValueError(f"proj_weight must be a square (D, C, p, p) kernel with C, p >= 1, "
                         f"got {tuple(proj_weight.shape)}")
    if inputs.shape[-1] != p * p * c:
        raise ValueError(f"inputs rows must have p*p*C = {p * p * c} entries for proj_weight "
                         f"{tuple(proj_weight.shape)}, got {inputs.shape[-1]}")
    # Under autocast F.linear casts all three to the autocast dtype (as Conv2d does in timm's PatchEmbed),
    # so bf16 rows meet the fp32 weights of mixed-precision training; float64 is never cast.
    autocast = (_autocast_enabled(inputs.device.type)
                and inputs.dtype in FLOAT_DTYPES and proj_weight.dtype in FLOAT_DTYPES)
    if proj_weight.dtype != inputs.dtype and not autocast:
        raise TypeError(f"proj_weight dtype {proj_weight.dtype} must match inputs dtype {inputs.dtype}")
    if proj_bias is not None:
        check_tensor("proj_bias", proj_bias, shape=(d,), dtypes=FLOAT_DTYPES if autocast else (inputs.dtype,))
    check_same_device(inputs=inputs, proj_weight=proj_weight, proj_bias=proj_bias)
    return F.linear(inputs, proj_weight.permute(0, 2, 3, 1).reshape(d, p * p * c), proj_bias)
