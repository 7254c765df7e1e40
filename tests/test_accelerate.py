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


class OfficialPatchEmbed(nn.Module):
    """timm 0.3.2's PatchEmbed, the one the official MAE code runs with: a Conv2d and no ``norm``."""

    def __init__(self, img_size=32, patch_size=4, in_chans=3, embed_dim=96):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def test_accelerate_takes_a_patch_embed_without_norm():
    plain = PlainMAE()
    plain.patch_embed = OfficialPatchEmbed()  # the fused encoder called patch_embed.norm: AttributeError
    fast = maskedssl.accelerate(copy.deepcopy(plain))
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_seeded(lambda: fast(imgs)[0]), _seeded(lambda: plain(imgs)[0]),
                               atol=1e-5, rtol=1e-5)


class L1MAE(PlainMAE):
    def forward_loss(self, imgs, pred, mask):
        return ((pred - self.patchify(imgs)).abs().mean(-1) * mask).sum() / mask.sum()


def test_accelerate_refuses_what_it_would_compute_differently():
    # an override of one method: the fused forward computed its own MSE (1.79 where the model's L1 gave 1.07)
    with pytest.raises(TypeError, match="forward_loss.*bypass the overrides"):
        maskedssl.accelerate(L1MAE())
    model = PlainMAE()
    model.decoder_pos_embed = nn.Parameter(model.decoder_pos_embed[:, 1:])  # no cls slot
    with pytest.raises(ValueError, match="decoder_pos_embed of shape"):
        maskedssl.accelerate(model)
    fast = maskedssl.accelerate(PlainMAE())
    imgs = torch.randn(2, 3, 32, 32)  # a 0-d tensor ratio, as the official int(L * (1 - ratio)) takes
    assert torch.equal(_seeded(lambda: fast(imgs, torch.tensor(0.5))[2]), _seeded(lambda: fast(imgs, 0.5)[2]))
    with pytest.raises(TypeError, match="floating point"):  # uint8 was divided by 255; the official conv
        fast(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_accelerated_models_copy_pickle_and_replicate_as_themselves(tmp_path):
    """The methods were bound to the instance: a pickle did not load back ('no attribute _forward'), and
    copy.copy / DataParallel replicas ran with the original's weights."""
    fast = maskedssl.accelerate(PlainMAE(depth=1, decoder_depth=1))
    assert maskedssl.accelerate(fast) is fast and type(fast).__name__ == "PlainMAE"
    assert isinstance(fast, PlainMAE)
    imgs = torch.randn(2, 3, 32, 32)
    want = _seeded(lambda: fast(imgs)[0])
    torch.save(fast, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(loaded) is type(fast)
    torch.testing.assert_close(_seeded(lambda: loaded(imgs)[0]), want)
    for other in (copy.copy(fast), fast._replicate_for_data_parallel()):
        assert other.forward.__self__ is other


def test_accelerated_forward_makes_no_index_check_syncs(monkeypatch):
    """Its masks are random_masks', valid by construction: the op calls made 4 range checks (syncs)."""
    fast = maskedssl.accelerate(PlainMAE(depth=1, decoder_depth=1))
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: calls.append(t.shape) or real(t))
    fast(torch.randn(2, 3, 32, 32))[0].backward()
    fast.forward_encoder(torch.randn(2, 3, 32, 32), 0.75)
    assert calls == []


def test_accelerated_forward_gives_the_images_their_gradient():
    plain = PlainMAE(depth=1, decoder_depth=1)
    fast = maskedssl.accelerate(copy.deepcopy(plain))
    grads = []
    for model in (plain, fast):
        imgs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
        _seeded(lambda: model(imgs)[0]).backward()  # mix_patchify has none: imgs.grad stayed None
        grads.append(imgs.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
