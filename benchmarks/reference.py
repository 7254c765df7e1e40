"""MAE, i-MAE and Self-guided MAE written the way their official code computes them: the baseline our
fused ops and models are measured against.

What makes them the "reference path" (each is what maskedssl replaces, see ../shared/KERNELS.md):
- position embeddings added to all L patch tokens, then the kept tokens gathered with an int64 index
  repeated to the full (B, K, D) shape (facebookresearch/mae ``random_masking``);
- the decoder concatenates mask tokens, builds another repeated (B, L, Dd) index, gathers, re-prepends cls
  and adds position embeddings, each a separate pass;
- i-MAE mixes in pixel space, then patchifies and normalizes each unmixed target in separate passes; the
  shared decoder runs once per branch and the frozen teacher once per unmixed image (not batched);
- Self-guided MAE's bi-partition builds the affinity and calls batched ``torch.linalg.eigh`` (float32, as a
  GPU user would; TokenCut itself calls scipy per image).

Deliberately *not* reproduced: the 2021 timm attention (q @ k.T, softmax, @ v). The blocks here are
current timm ``Block``s, which use fused scaled-dot-product attention like maskedssl's models, so a
speed-up measured against this file comes from what maskedssl changes, not from the attention kernel.
Everything runs on CPU too (small configs), which the tests use.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn

# Init-time and layout helpers are ours (the same functions the official code has); what the reference
# keeps of the official code is how the training step moves its data.
from maskedssl.models.vit import sincos_pos_embed
from maskedssl.ops import patchify


@dataclasses.dataclass
class ReferenceConfig:
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
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    # Self-guided MAE
    warmup_frac: float = 0.1
    sg_layer: int = -1
    hint_ratio: float = 0.05
    tau: float | None = None
    eps: float = 1e-5


def config_from_model(model: nn.Module) -> ReferenceConfig:
    """The reference twin of one of our models: same sizes and method options, read from ``model.config``
    and its network ``model.config.arch`` (fields named as in ``ReferenceConfig``; those it lacks keep their
    defaults)."""
    config = getattr(model, "config", model)
    values = {}
    for source in (getattr(config, "arch", None), config):
        values.update({f.name: getattr(source, f.name) for f in dataclasses.fields(ReferenceConfig)
                       if hasattr(source, f.name)})
    for name in ("img_size", "patch_size", "in_chans"):
        if name not in values and hasattr(model, name):
            values[name] = getattr(model, name)
    for name in ("img_size", "patch_size"):
        if isinstance(values.get(name), (tuple, list)):
            values[name] = values[name][0]
    return ReferenceConfig(**values)


def make_blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth))


class ReferenceMAE(nn.Module):
    """facebookresearch/mae ``MaskedAutoencoderViT``: encoder, decoder, loss, with its passes as written and
    its method signatures (so ``maskedssl.accelerate`` applies to it). ``random_masking`` and
    ``forward_encoder`` also take an optional ``ids_shuffle``: the variants' own masks."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.cfg = cfg
        self.norm_pix_loss = cfg.norm_pix_loss
        d, dd, p = cfg.embed_dim, cfg.decoder_embed_dim, cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.img_size, p, cfg.in_chans, d)
        grid = cfg.img_size // p
        self.num_patches = grid * grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(sincos_pos_embed(d, grid, grid)[None], requires_grad=False)
        self.blocks = make_blocks(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(dd, grid, grid)[None], requires_grad=False)
        self.decoder_blocks = make_blocks(dd, cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio)
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, p * p * cfg.in_chans)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.cfg.patch_size)

    def random_masking(self, x: torch.Tensor, mask_ratio: float, ids_shuffle: torch.Tensor | None = None):
        """Keep the first K of a random shuffle: the official gather with an index repeated to (B, K, D)."""
        b, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        if ids_shuffle is None:
            noise = torch.rand(b, length, device=x.device)
            ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(b, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_masked, mask, ids_restore

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def prepend_cls(self, x: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, ids_shuffle: torch.Tensor | None = None):
        x, mask, ids_restore = self.random_masking(self.embed(imgs), mask_ratio, ids_shuffle)
        x = self.prepend_cls(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        return self.decode_tokens(self.decoder_embed(x), ids_restore)

    def decode_tokens(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """The decoder after ``decoder_embed`` (i-MAE's heads replace that layer)."""
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None,
                ids_shuffle: torch.Tensor | None = None, **_):
        """-> ``(loss, pred, mask)``, as the official model."""
        mask_ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, ids_shuffle)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


class ReferenceIMAE(nn.Module):
    """i-MAE as VILA-Lab/i-mae computes it (with the teacher fed the unmixed images, see RECIPES.md)."""

    def __init__(self, cfg: ReferenceConfig, teacher: bool = True):
        super().__init__()
        self.cfg = cfg
        self.mae = ReferenceMAE(cfg)
        del self.mae.decoder_embed  # replaced by the two disentangling heads
        self.head_sub = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.head_dom = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.teacher = ReferenceMAE(cfg).requires_grad_(False).eval() if teacher else None

    def forward(self, imgs: torch.Tensor, *, partner: torch.Tensor | None = None, lam: float | None = None,
                **_) -> torch.Tensor:
        b = imgs.shape[0]
        if partner is None:
            partner = torch.randperm(b, device=imgs.device)
        if lam is None:  # one weight per batch, folded so the partner is the subordinate image
            lam = float(torch.distributions.Beta(1.0, 1.0).sample())
        lam = min(lam, 1.0 - lam)
        other = imgs[partner]
        mixed = lam * other + (1 - lam) * imgs
        sub, dom = other, imgs
        ids_shuffle = torch.argsort(torch.rand(b, self.mae.num_patches, device=imgs.device), dim=1)
        latent, mask, ids_restore = self.mae.forward_encoder(mixed, self.cfg.mask_ratio, ids_shuffle)
        z_sub, z_dom = self.head_sub(latent), self.head_dom(latent)
        pred_sub = self.mae.decode_tokens(z_sub, ids_restore)
        pred_dom = self.mae.decode_tokens(z_dom, ids_restore)
        loss = self.mae.forward_loss(sub, pred_sub, mask) + self.mae.forward_loss(dom, pred_dom, mask)
        if self.teacher is not None:
            with torch.no_grad():
                ratio = self.cfg.mask_ratio
                t_sub = self.teacher.decoder_embed(self.teacher.forward_encoder(sub, ratio, ids_shuffle)[0])
                t_dom = self.teacher.decoder_embed(self.teacher.forward_encoder(dom, ratio, ids_shuffle)[0])
            loss = loss + F.mse_loss(z_sub, t_sub) + F.mse_loss(z_dom, t_dom)
        return loss


def ncut_eigh(feats: torch.Tensor, tau: float | None, eps: float):
    """TokenCut's bi-partition by batched ``torch.linalg.eigh`` -> (foreground (B, N) bool, score (B, N))."""
    f = F.normalize(feats.float(), dim=-1)
    cos = f @ f.transpose(1, 2)
    a = cos.clamp_min(eps) if tau is None else torch.where(cos > tau, 1.0, eps)
    d_isqrt = a.sum(-1).rsqrt()
    _, vecs = torch.linalg.eigh(d_isqrt.unsqueeze(-1) * a * d_isqrt.unsqueeze(-2))
    v = vecs[..., -2] * d_isqrt
    seed = v.abs().argmax(dim=1, keepdim=True)
    above = v > v.mean(dim=1, keepdim=True)
    foreground = torch.where(above.gather(1, seed), above, ~above)
    fg_mean = (f * foreground.unsqueeze(-1)).sum(1) / foreground.sum(1, keepdim=True).clamp_min(1)
    score = torch.einsum("bnd,bd->bn", f, F.normalize(fg_mean, dim=-1))
    return foreground, score


class ReferenceSGMAE(nn.Module):
    """Self-guided MAE: a MAE whose mask, after warm-up, covers the patches most similar to the
    bi-partition's foreground first, with a few hint tokens left visible."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.cfg = cfg
        self.mae = ReferenceMAE(cfg)

    @torch.no_grad()
    def patch_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch tokens after ``sg_layer`` blocks (0: the embeddings, -1: the last block), all patches."""
        x = self.mae.prepend_cls(self.mae.embed(imgs))
        for blk in self.mae.blocks[: self.cfg.sg_layer % (self.cfg.depth + 1)]:
            x = blk(x)
        return x[:, 1:, :]

    @torch.no_grad()
    def informed_shuffle(self, imgs: torch.Tensor) -> torch.Tensor:
        _, score = ncut_eigh(self.patch_features(imgs), self.cfg.tau, self.cfg.eps)
        b, length = score.shape
        masked = length - int(length * (1 - self.cfg.mask_ratio))
        order = torch.argsort(score, dim=1, descending=True)  # mask the most object-like patches first
        hints = int(round(self.cfg.hint_ratio * masked))
        if hints:  # swap a random few of the would-be-masked with random would-be-kept patches
            pick_m = torch.rand(b, masked, device=imgs.device).argsort(1)[:, :hints]
            pick_k = masked + torch.rand(b, length - masked, device=imgs.device).argsort(1)[:, :hints]
            a, c = order.gather(1, pick_m), order.gather(1, pick_k)
            order = order.scatter(1, pick_m, c).scatter(1, pick_k, a)
        return order.flip(1)  # kept first, as the official shuffle order

    def forward(self, imgs: torch.Tensor, *, progress: float = 0.0, **_) -> torch.Tensor:
        informed = progress >= self.cfg.warmup_frac
        return self.mae(imgs, ids_shuffle=self.informed_shuffle(imgs) if informed else None)[0]


def build_reference(method: str, cfg: ReferenceConfig) -> nn.Module:
    """The reference model for ``method`` ("mae", "imae", "sgmae"). Its forward returns the loss (MAE: the
    official ``(loss, pred, mask)``)."""
    if method == "mae":
        return ReferenceMAE(cfg)
    if method == "imae":
        return ReferenceIMAE(cfg)
    if method == "sgmae":
        return ReferenceSGMAE(cfg)
    raise ValueError(f"method must be one of 'mae', 'imae', 'sgmae', got {method!r}")
