"""Shared pieces of every model: architecture presets, fixed 2-D sin-cos position embeddings, and the
encoder/decoder trunk with facebookresearch/mae's parameter names.

Data path of one training step (each arrow one call):
  images -> ``mix_patchify`` (mix, patchify, kept input rows, normalised target rows)
         -> ``embed_patches`` on the kept rows only (the patch projection as a GEMM: 1/4 of the work of
            embedding every patch and masking afterwards) + their position rows -> encoder blocks
         -> decoder width -> ``scatter_tokens`` (mask tokens, unshuffle, position add) -> decoder blocks
         -> ``gather_tokens`` of the masked rows -> prediction head on masked tokens only -> loss.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from .. import ops
from ..ops import embed_patches, gather_tokens, mix_patchify, scatter_tokens, unpatchify

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class ModelConfig:
    """Architecture and input format: what the network looks like and what pixels it consumes.

    ``mean``/``std`` normalise uint8 images inside ``mix_patchify``; None means ImageNet's statistics for
    3 channels and 0.5/0.5 otherwise. Float images are taken as already normalised with them.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "num_heads", "decoder_embed_dim",
                     "decoder_num_heads", "depth", "decoder_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            # depth 0 is a valid (if useless) trunk: the tokens go straight to the final norm
            if value < (0 if name.endswith("depth") else 1):
                raise ValueError(f"{name} must be {'>= 0' if name.endswith('depth') else 'positive'}, "
                                 f"got {value}")
        if isinstance(self.mlp_ratio, bool) or not isinstance(self.mlp_ratio, (int, float)):
            raise TypeError(f"mlp_ratio must be a float, got {type(self.mlp_ratio).__name__}")
        if not 0 < self.mlp_ratio < math.inf:
            raise ValueError(f"mlp_ratio must be positive and finite, got {self.mlp_ratio}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}")
        for name in ("embed_dim", "decoder_embed_dim"):
            # half the channels encode the column, half the row, each as sin and cos
            if getattr(self, name) % 4:
                raise ValueError(f"{name} must be divisible by 4 for 2-D sin-cos position embeddings")
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"{dim}={getattr(self, dim)} is not divisible by "
                                 f"{heads}={getattr(self, heads)}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise TypeError(f"{name} must be a sequence of floats, got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))  # a list would make it unhashable
            if len(value) != self.in_chans:
                raise ValueError(f"{name} must have in_chans={self.in_chans} entries, got {value}")
            # the models skip mix_patchify's value checks (one sync per step), so they are made here once:
            # a zero std divides by zero and a non-finite statistic turns every loss into NaN
            if not all(math.isfinite(v) and (name == "mean" or v > 0) for v in value):
                rule = "finite, positive values" if name == "std" else "finite values"
                raise ValueError(f"{name} must hold {rule}, got {value}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def pixel_mean(self) -> tuple[float, ...]:
        if self.mean is not None:
            return tuple(self.mean)
        return IMAGENET_MEAN if self.in_chans == 3 else (0.5,) * self.in_chans

    @property
    def pixel_std(self) -> tuple[float, ...]:
        if self.std is not None:
            return tuple(self.std)
        return IMAGENET_STD if self.in_chans == 3 else (0.5,) * self.in_chans


def _vit(img_size, patch_size, width, depth, heads, dec_width, dec_depth, dec_heads) -> ModelConfig:
    return ModelConfig(img_size=img_size, patch_size=patch_size, embed_dim=width, depth=depth,
                       num_heads=heads, decoder_embed_dim=dec_width, decoder_depth=dec_depth,
                       decoder_num_heads=dec_heads)


# Every size preset has MAE's decoder: 512 wide, 8 blocks, 16 heads (the MAE paper's default, which it
# keeps for ViT-B, -L and -H). Next to ViT-T/S encoders it is the larger half of the network; a lighter one
# is an option away (decoder_embed_dim, decoder_depth, decoder_num_heads).
MAE_DECODER = (512, 8, 16)
PRESETS: dict[str, ModelConfig] = {
    "vit_tiny": _vit(224, 16, 192, 12, 3, *MAE_DECODER),
    "vit_small": _vit(224, 16, 384, 12, 6, *MAE_DECODER),
    "vit_base": _vit(224, 16, 768, 12, 12, *MAE_DECODER),
    "vit_large": _vit(224, 16, 1024, 24, 16, *MAE_DECODER),
    "cifar_tiny": _vit(32, 4, 192, 12, 3, *MAE_DECODER),
    "cifar_tiny_p2": _vit(32, 2, 192, 12, 3, *MAE_DECODER),
    "cifar_small": _vit(32, 4, 384, 12, 6, *MAE_DECODER),
    "cifar_small_p2": _vit(32, 2, 384, 12, 6, *MAE_DECODER),
    "tiny_imagenet": _vit(64, 8, 384, 12, 6, *MAE_DECODER),
    # CPU tests and the 5-minute demo
    "micro": _vit(32, 4, 96, 4, 3, 64, 2, 4),
}


def resolve_arch(preset: str | ModelConfig, **overrides) -> ModelConfig:
    """A preset by name (or a ModelConfig as is), with any of its fields overridden."""
    if isinstance(preset, ModelConfig):
        arch = preset
    elif preset in PRESETS:
        arch = PRESETS[preset]
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(arch, **overrides) if overrides else arch


@dataclass(frozen=True)
class MAEConfig:
    """MAE's objective. Every method's config extends this one; ``arch`` is the network."""

    arch: ModelConfig = field(default_factory=lambda: PRESETS["micro"])
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True

    def __post_init__(self):
        if not isinstance(self.arch, ModelConfig):
            raise TypeError(f"arch must be a ModelConfig (e.g. PRESETS['micro'] or resolve_arch('micro')), "
                            f"got {type(self.arch).__name__}")
        if isinstance(self.mask_ratio, bool) or not isinstance(self.mask_ratio, numbers.Real):
            raise TypeError(f"mask_ratio must be a float, got {type(self.mask_ratio).__name__}")
        object.__setattr__(self, "mask_ratio", float(self.mask_ratio))  # numpy scalars too
        if not isinstance(self.norm_pix_loss, bool):
            raise TypeError(f"norm_pix_loss must be a bool, got {type(self.norm_pix_loss).__name__}")
        # the encoder needs a visible patch, and the loss is a mean over the masked ones: with none masked
        # it is 0/0, a NaN at the first step
        length = self.arch.num_patches
        if not 0.0 < self.mask_ratio < 1.0 or not 1 <= ops.num_kept(length, self.mask_ratio) < length:
            raise ValueError(f"mask_ratio={self.mask_ratio} must be in (0, 1), keep at least one of the "
                             f"L={length} patches and mask at least one")


def make_config(config_class: type, preset: str | ModelConfig, **options):
    """``config_class`` (MAEConfig or a subclass) from a preset and keyword options: its own fields, plus
    ModelConfig fields (img_size, in_chans, ...) overriding the preset. Unknown names raise TypeError."""
    own = {f.name for f in dataclasses.fields(config_class)} - {"arch"}
    arch_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(options) - own - arch_fields)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for {config_class.__name__}; options are "
                        f"{sorted(own)} and the architecture's {sorted(arch_fields)}")
    arch = resolve_arch(preset, **{k: v for k, v in options.items() if k in arch_fields})
    return config_class(arch=arch, **{k: v for k, v in options.items() if k in own})


@dataclass
class ModelOutput:
    """What every model's forward returns.

    loss: the scalar to minimise; losses: detached scalars for logging (``loss`` included); mask: (B, L)
    float, 1 = masked; extras: method-specific values (i-MAE: ``lam``, ``sub_weight``; Self-guided MAE:
    ``informed``, ``ncut``).
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    mask: torch.Tensor
    extras: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- position embeddings
def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """(cls + h*w, dim) float32 fixed 2-D sin-cos embedding, patches in raster order, cls row zero.

    As facebookresearch/mae: the first half of the channels encodes the column, the second the row,
    so the values equal those stored in its checkpoints.
    """
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, cols.flatten()), _sincos_1d(dim // 2, rows.flatten())], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)
    return emb.float()


# ----------------------------------------------------------------------------- the trunk
def init_weights(module: nn.Module) -> None:
    """MAE's initialisation of linear and LayerNorm layers."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _layer_norm(dim: int, **kwargs) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


def _blocks(dim, depth, heads, mlp_ratio) -> nn.ModuleList:
    # timm's Attention uses F.scaled_dot_product_attention (fused attention) by default
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=_layer_norm)
                         for _ in range(depth))


class MaskedViT(nn.Module):
    """Encoder and decoder of a masked autoencoder, with facebookresearch/mae's parameter names.

    Subclasses (MAE, i-MAE, Self-guided MAE) add their objective. ``with_decoder_embed=False`` leaves out
    ``decoder_embed`` for models that map encoder width to decoder width their own way (i-MAE's heads).
    """

    config_class = MAEConfig

    def __init__(self, config: MAEConfig, with_decoder_embed: bool = True):
        super().__init__()
        if not isinstance(config, self.config_class):  # a preset name or a ModelConfig failed much later
            raise TypeError(f"config must be a {self.config_class.__name__} (build_model(method, preset, "
                            f"...) makes one from a preset), got {type(config).__name__}")
        self.config = config
        arch = config.arch
        self.patch_size = arch.patch_size
        self.img_size = arch.img_size
        self.in_chans = arch.in_chans
        self.num_patches = arch.num_patches
        grid = arch.img_size // arch.patch_size
        d, dd = arch.embed_dim, arch.decoder_embed_dim

        self.patch_embed = PatchEmbed(arch.img_size, arch.patch_size, arch.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # fixed, yet Parameters (requires_grad=False) as in MAE, so checkpoints carry them under these names
        self.pos_embed = nn.Parameter(sincos_pos_embed(d, grid, grid)[None], requires_grad=False)
        self.blocks = _blocks(d, arch.depth, arch.num_heads, arch.mlp_ratio)
        self.norm = _layer_norm(d)

        self.decoder_embed = nn.Linear(d, dd) if with_decoder_embed else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(dd, grid, grid)[None], requires_grad=False)
        self.decoder_blocks = _blocks(dd, arch.decoder_depth, arch.decoder_num_heads, arch.mlp_ratio)
        self.decoder_norm = _layer_norm(dd)
        self.decoder_pred = nn.Linear(dd, arch.patch_size ** 2 * arch.in_chans)

        # not in the state dict: official checkpoints must load without extra keys
        self.register_buffer("mean", torch.tensor(arch.pixel_mean), persistent=False)
        self.register_buffer("std", torch.tensor(arch.pixel_std), persistent=False)

        # the projection is a Linear on flattened patches: initialise it as one (MAE does the same)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(d, -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, child in self.named_children():
            if name != "patch_embed":
                child.apply(init_weights)

    # ---------------------------------------------------------------- pixels
    @staticmethod
    def check_progress(progress: float) -> None:
        """``progress``, the fraction of training done, must be a number in [0, 1] (NaN would compare as
        past any warm-up). Not under torch.compile: guards on its value would recompile every step."""
        if torch.compiler.is_compiling():
            return
        if isinstance(progress, bool) or not isinstance(progress, (int, float)):
            raise TypeError(f"progress must be a number in [0, 1], got {type(progress).__name__}")
        if not 0 <= progress <= 1:
            raise ValueError(f"progress must be in [0, 1] (the fraction of training done), got {progress}")

    def check_images(self, imgs: torch.Tensor) -> None:
        """``imgs`` must be (B, in_chans, img_size, img_size). Another size would patchify to another grid
        whose rows the masks still index in range: the step would run on the wrong patches, silently."""
        if not isinstance(imgs, torch.Tensor):
            raise TypeError(f"imgs must be a torch.Tensor, got {type(imgs).__name__}")
        expected = (self.in_chans, self.img_size, self.img_size)
        if imgs.dim() != 4 or tuple(imgs.shape[1:]) != expected:
            raise ValueError(f"imgs must be (B, {', '.join(map(str, expected))}) for this model, "
                             f"got shape {tuple(imgs.shape)}")

    def pixel_options(self, imgs: torch.Tensor) -> dict:
        """``mix_patchify``'s options for this model: rows in the patch projection's dtype; mean/std for
        uint8 images (float ones are already normalised)."""
        options = {"out_dtype": self.patch_embed.proj.weight.dtype}
        if imgs.dtype == torch.uint8:
            options.update(mean=self.mean, std=self.std)
        return options

    def patch_rows(self, imgs: torch.Tensor) -> torch.Tensor:
        """All L normalised patch rows (B, L, p*p*C), the encoder's input without masking."""
        self.check_images(imgs)
        # no target rows (mix_patchify would otherwise write a second copy of every row, unused here)
        no_rows = torch.empty(imgs.shape[0], 0, dtype=torch.long, device=imgs.device)
        rows, _ = mix_patchify(imgs, self.patch_size, ids_masked=no_rows, norm_pix=False, check_indices=False,
                               **self.pixel_options(imgs))  # (the config checked the statistics)
        return rows

    # ---------------------------------------------------------------- encoder
    def embed(self, inputs: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch rows (B, K, p*p*C) at positions ``ids_keep`` (None: all L, in order) -> tokens
        (B, 1+K, D), cls first."""
        x = embed_patches(inputs, self.patch_embed.proj.weight, self.patch_embed.proj.bias)
        pos = self.pos_embed[0, 1:].to(x.dtype)
        x = x + (pos if ids_keep is None else pos[ids_keep])
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def encode(self, inputs: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch rows at ``ids_keep`` -> latent (B, 1+K, D), cls first, after the final norm."""
        x = self.embed(inputs, ids_keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def hidden_state(self, inputs: torch.Tensor, layer: int) -> torch.Tensor:
        """Patch tokens (B, L, D) of all patches after ``layer`` blocks (0: the embeddings; -1: the last
        block; negative counts from the end, as Python indexes the depth+1 hidden states)."""
        depth = len(self.blocks)
        if not -depth - 1 <= layer <= depth:
            raise ValueError(f"layer must be in [{-depth - 1}, {depth}] for depth {depth}, got {layer}")
        x = self.embed(inputs)
        for block in self.blocks[:layer % (depth + 1)]:
            x = block(x)
        return x[:, 1:]

    def forward_features(self, imgs: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """Encoder output on all patches, no masking: (B, 1+L, D), or (B, D) with ``pool`` "cls"/"mean"."""
        if pool not in (None, "cls", "mean"):
            raise ValueError(f"pool must be 'cls', 'mean' or None, got {pool!r}")
        x = self.encode(self.patch_rows(imgs))
        if pool == "cls":
            return x[:, 0]
        if pool == "mean":
            return x[:, 1:].mean(dim=1)
        return x

    # ---------------------------------------------------------------- decoder
    def decode(self, tokens: torch.Tensor, ids_restore: torch.Tensor,
               ids_pred: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder-width tokens (B, 1+K, Dd), cls first -> predicted pixel rows (B, M, p*p*C) at the
        positions ``ids_pred`` (B, M) (None: all L, in order)."""
        b = tokens.shape[0]
        # the cls token rides along as visible slot 0 at position 0, so one call builds the whole decoder
        # input (patch slots shift by one) and no concatenation copies it afterwards. The indices come from
        # the model's own masks, valid by construction: no range check, so the step never waits on a sync.
        restore = torch.cat([ids_restore.new_zeros(b, 1), ids_restore + 1], dim=1)
        x = scatter_tokens(tokens, restore, self.mask_token.to(tokens.dtype),
                           self.decoder_pos_embed[0].to(tokens.dtype), check_indices=False)
        for block in self.decoder_blocks:
            x = block(x)
        # the norm and the head run only where a prediction is needed (the masked patches during training):
        # the norm acts on each row alone, so gathering first gives the same rows, and under autocast it
        # saves the float32 norm output (and its gradient) of the rows no loss reads
        x = x[:, 1:] if ids_pred is None else gather_tokens(x, ids_pred + 1, check_indices=False)
        return self.decoder_pred(self.decoder_norm(x))

    # ---------------------------------------------------------------- pictures
    def to_pixels(self, rows: torch.Tensor) -> torch.Tensor:
        """Normalised patch rows (B, L, p*p*C) -> displayable images (B, C, H, W) in [0, 1]."""
        imgs = unpatchify(rows.float(), self.patch_size, self.img_size, self.img_size, self.in_chans)
        return (imgs * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)).clamp(0, 1)

    def prediction_rows(self, pred: torch.Tensor, true_rows: torch.Tensor) -> torch.Tensor:
        """Predictions in the rows' pixel space: with norm_pix_loss they are per-patch normalised, so
        each is mapped back with the true patch's mean and std (as MAE's visualisations do)."""
        if not self.config.norm_pix_loss:
            return pred.float()
        t = true_rows.float()
        return pred.float() * (t.var(dim=-1, keepdim=True) + 1e-6).sqrt() + t.mean(dim=-1, keepdim=True)

    def masked_pixels(self, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The input as the encoder sees it: masked patches grey."""
        masked = unpatchify(mask[..., None].expand(rows.shape).float(), self.patch_size, self.img_size,
                            self.img_size, self.in_chans)
        return torch.where(masked > 0, 0.5, self.to_pixels(rows))


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 over every element.

    On masked rows only this equals MAE's ``(per-patch mean * mask).sum() / mask.sum()``: each masked
    patch has p*p*C values and weight 1.
    """
    return F.mse_loss(pred.float(), target.float())
