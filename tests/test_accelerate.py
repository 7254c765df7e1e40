"""``maskedssl.accelerate``: an MAE-style MaskedAutoencoderViT gives the same outputs through the fused ops.

``PlainMAE`` is our own small model with facebookresearch/mae's interface (method names, attribute names,
return values), written plainly from the algorithm: embed every patch, add positions, shuffle-and-keep,
cls, blocks; mask tokens, unshuffle, positions, blocks, head on every token; masked MSE.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

import maskedssl
from maskedssl.models.vit import sincos_pos_embed


def _norm(dim, **kwargs):
    return nn.LayerNorm(dim, eps=1e-6, **kwargs)


class PlainMAE(nn.Module):
    def __init__(self, img_size=32, patch_size=4, in_chans=3, embed_dim=96, depth=4, num_heads=3,
                 decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, norm_pix_loss=True):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        length = self.patch_embed.num_patches
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, grid, grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, 4.0, qkv_bias=True, norm_layer=_norm)
                                    for _ in range(depth))
        self.norm = _norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_embed_dim) * 0.02)
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_embed_dim, grid, grid)[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, 4.0, qkv_bias=True,
                                                  norm_layer=_norm) for _ in range(decoder_depth))
        self.decoder_norm = _norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.norm_pix_loss = norm_pix_loss
        assert length == grid * grid

    def patchify(self, imgs):
        p = self.patch_embed.patch_size[0]
        b, c, height, width = imgs.shape
        x = imgs.reshape(b, c, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (height // p) * (width // p), p * p * c)

    def random_masking(self, x, mask_ratio):
        b, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        noise = torch.rand(b, length, device=x.device)
        order = torch.argsort(noise, dim=1)
        restore = torch.argsort(order, dim=1)
        kept = torch.gather(x, 1, order[:, :keep, None].repeat(1, 1, d))
        mask = torch.ones(b, length, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, restore), restore

    def forward_encoder(self, imgs, mask_ratio):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, restore = self.random_masking(x, mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        b, length = ids_restore.shape
        tokens = torch.cat([x[:, 1:], self.mask_token.repeat(b, length + 1 - x.shape[1], 1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _seeded(fn, seed=7):
    torch.manual_seed(seed)
    return fn()


@pytest.mark.parametrize("norm_pix_loss", [True, False])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_accelerate_matches_plain_forward(norm_pix_loss, mask_ratio):
    plain = PlainMAE(norm_pix_loss=norm_pix_loss)
    fast = maskedssl.accelerate(copy.deepcopy(plain))
    imgs = torch.randn(3, 3, 32, 32)
    ref = _seeded(lambda: plain(imgs, mask_ratio))
    got = _seeded(lambda: fast(imgs, mask_ratio))
    assert torch.equal(got[2], ref[2])
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)


def test_accelerate_gradients_match():
    plain = PlainMAE()
    fast = maskedssl.accelerate(copy.deepcopy(plain))
    imgs = torch.randn(2, 3, 32, 32)
    _seeded(lambda: plain(imgs)[0]).backward()
    _seeded(lambda: fast(imgs)[0]).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_accelerated_methods_keep_their_contracts():
    plain = PlainMAE()
    fast = maskedssl.accelerate(copy.deepcopy(plain))
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(fast.patchify(imgs), plain.patchify(imgs))
    tokens = torch.randn(2, 64, 96)
    for got, ref in zip(_seeded(lambda: fast.random_masking(tokens, 0.75)),
                        _seeded(lambda: plain.random_masking(tokens, 0.75))):
        assert torch.equal(got, ref)
    latent, mask, restore = _seeded(lambda: fast.forward_encoder(imgs, 0.75))
    ref_latent, ref_mask, ref_restore = _seeded(lambda: plain.forward_encoder(imgs, 0.75))
    assert torch.equal(mask, ref_mask) and torch.equal(restore, ref_restore)
    torch.testing.assert_close(latent, ref_latent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.forward_decoder(latent, restore), plain.forward_decoder(latent, restore),
                               atol=1e-5, rtol=1e-5)


def test_accelerate_returns_the_same_object_and_rejects_other_models():
    model = PlainMAE()
    assert maskedssl.accelerate(model) is model
    with pytest.raises(TypeError, match="lacks"):
        maskedssl.accelerate(nn.Linear(2, 2))


def test_accelerated_model_refuses_images_of_another_size():
    """The official patch_embed asserts the size; the fused path skipped it and trained on a 48 px image's
    144-patch grid through the 64-patch masks, silently."""
    fast = maskedssl.accelerate(PlainMAE())
    for shape in [(2, 3, 48, 48), (2, 3, 32, 48), (2, 1, 32, 32)]:
        for call in (fast.forward, fast.forward_encoder):
            with pytest.raises(ValueError, match=r"imgs must be \(B, 3, 32, 32\)"):
                call(torch.randn(shape), 0.75)


def test_accelerated_forward_compiles_without_graph_breaks():
    fast = maskedssl.accelerate(PlainMAE(depth=1, decoder_depth=1))  # small graph: fast to compile
    imgs = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(fast.forward, fullgraph=True, backend="aot_eager")
    loss, pred, mask = _seeded(lambda: compiled(imgs, 0.75))
    ref = _seeded(lambda: fast(imgs, 0.75))
    torch.testing.assert_close(loss, ref[0], atol=1e-5, rtol=1e-5)
    loss.backward()
