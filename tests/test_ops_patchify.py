"""patchify / unpatchify against hand-written loops, and embed_patches against timm's PatchEmbed conv."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA
from timm.layers import PatchEmbed

from maskedssl import ops


def patchify_loop(imgs, p):
    b, c, height, width = imgs.shape
    h, w = height // p, width // p
    out = torch.empty(b, h * w, p * p * c, dtype=imgs.dtype)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                for py in range(p):
                    for px in range(p):
                        for ch in range(c):
                            out[n, i * w + j, (py * p + px) * c + ch] = imgs[n, ch, i * p + py, j * p + px]
    return out


@pytest.mark.parametrize("b,c,height,width,p", [(2, 3, 8, 8, 4), (1, 1, 12, 20, 4), (2, 3, 6, 4, 2),
                                                (1, 3, 14, 28, 14), (1, 1, 16, 16, 16)])
def test_patchify_matches_loop_and_round_trips(b, c, height, width, p):
    imgs = torch.randn(b, c, height, width)
    rows = ops.patchify(imgs, p)
    assert torch.equal(rows, patchify_loop(imgs, p))
    back = ops.unpatchify(rows, p, height=height, width=width, channels=c)
    assert torch.equal(back, imgs)
    if height == width:
        assert torch.equal(ops.unpatchify(rows, p, channels=c), imgs)


def test_patchify_non_contiguous_and_dtypes():
    base = torch.randint(0, 256, (2, 12, 8, 3), dtype=torch.uint8)
    imgs = base.permute(0, 3, 1, 2)
    assert torch.equal(ops.patchify(imgs, 4), patchify_loop(imgs.contiguous(), 4))
    half = torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)
    assert ops.patchify(half, 4).dtype == torch.bfloat16


def test_patchify_is_differentiable():
    imgs = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: ops.patchify(x, 4), (imgs,))
    rows = torch.randn(1, 4, 48, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: ops.unpatchify(x, 4), (rows,))


@pytest.mark.parametrize("call,err,match", [
    (lambda: ops.patchify(torch.randn(1, 3, 10, 8), 4), ValueError, "not divisible"),
    (lambda: ops.patchify(torch.randn(3, 8, 8), 4), ValueError, "4-D"),
    (lambda: ops.patchify(torch.randn(1, 3, 8, 8), 0), ValueError, "patch_size"),
    (lambda: ops.patchify(torch.randn(1, 3, 8, 8), 2.0), TypeError, "patch_size"),
    (lambda: ops.patchify([[1.0]], 4), TypeError, "imgs"),
    (lambda: ops.unpatchify(torch.randn(1, 6, 48), 4), ValueError, "not a square grid"),
    (lambda: ops.unpatchify(torch.randn(1, 4, 40), 4), ValueError, "p\\*p\\*C"),
    (lambda: ops.unpatchify(torch.randn(1, 4, 48), 4, height=8), ValueError, "both height and width"),
    (lambda: ops.unpatchify(torch.randn(1, 4, 48), 4, height=8, width=12), ValueError, "gives 6 patches"),
    (lambda: ops.unpatchify(torch.randn(4, 48), 4), ValueError, "3-D"),
    (lambda: ops.patchify(torch.randn(1, 0, 8, 8), 4), ValueError, "channel"),
    (lambda: ops.unpatchify(torch.randn(1, 6, 16), 4, channels=3), ValueError, "channels=3"),
    # negative or float sizes used to reach reshape (RuntimeError / a message about tuples of ints)
    (lambda: ops.unpatchify(torch.randn(1, 6, 48), 4, height=-8, width=-12), ValueError, "height"),
    (lambda: ops.unpatchify(torch.randn(1, 6, 48), 4, height=8.0, width=12.0), TypeError, "height"),
    (lambda: ops.unpatchify(torch.randn(1, 4, 0), 4), ValueError, "p\\*p\\*C"),
])
def test_patchify_rejects(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_empty_image_round_trips():
    imgs = torch.randn(2, 3, 0, 8)  # unpatchify used to refuse height=0 that patchify takes
    rows = ops.patchify(imgs, 4)
    assert rows.shape == (2, 0, 48)
    assert ops.unpatchify(rows, 4, height=0, width=8).shape == imgs.shape


@pytest.mark.parametrize("c", [1, 2, 3, 4])
def test_unpatchify_infers_channels(c):
    # channels used to default to 3: a 1-channel round trip needed channels=1 spelled out
    imgs = torch.randn(2, c, 8, 12)
    assert torch.equal(ops.unpatchify(ops.patchify(imgs, 4), 4, 8, 12), imgs)
    square = torch.randn(2, c, 8, 8)
    assert torch.equal(ops.unpatchify(ops.patchify(square, 2), 2), square)


def test_unpatchify_square_compiles_with_dynamic_shapes():
    # the square side came from math.isqrt, which dynamo cannot trace on a symbolic L: a graph break
    # (an error under fullgraph) as soon as the token count was dynamic
    compiled = torch.compile(lambda x: ops.unpatchify(x, 2), fullgraph=True, dynamic=True,
                             backend="aot_eager")
    for b, c, side in ((2, 3, 4), (3, 1, 6), (1, 3, 14)):
        imgs = torch.randn(b, c, side, side)
        assert torch.equal(compiled(ops.patchify(imgs, 2)), imgs)


# ----------------------------------------------------------------------------- embed_patches
@pytest.mark.parametrize("p,c,height,width", [(2, 3, 8, 8), (4, 1, 12, 20), (8, 3, 16, 24), (14, 3, 28, 28),
                                              (16, 1, 32, 16), (16, 3, 32, 32)])
def test_embed_patches_equals_patch_embed_conv(p, c, height, width):
    embed = PatchEmbed(img_size=(height, width), patch_size=p, in_chans=c, embed_dim=24).double()
    imgs = torch.randn(2, c, height, width, dtype=torch.float64)
    want = embed(imgs)
    got = ops.embed_patches(ops.patchify(imgs, p), embed.proj.weight, embed.proj.bias)
    torch.testing.assert_close(got, want)
    # on the kept rows only: the conv's tokens at those rows
    ids = torch.stack([torch.randperm(want.shape[1])[: max(1, want.shape[1] // 4)] for _ in range(2)])
    kept = torch.gather(ops.patchify(imgs, p), 1, ids.unsqueeze(-1).expand(-1, -1, p * p * c))
    torch.testing.assert_close(ops.embed_patches(kept, embed.proj.weight, embed.proj.bias),
                               torch.gather(want, 1, ids.unsqueeze(-1).expand(-1, -1, 24)))


def test_embed_patches_gradients_match_conv():
    embed = PatchEmbed(img_size=(8, 12), patch_size=4, in_chans=3, embed_dim=16).double()
    imgs = torch.randn(2, 3, 8, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 6, 16, dtype=torch.float64)
    (embed(imgs) * weights).sum().backward()
    want = [t.grad.clone() for t in (imgs, embed.proj.weight, embed.proj.bias)]
    for t in (imgs, embed.proj.weight, embed.proj.bias):
        t.grad = None
    (ops.embed_patches(ops.patchify(imgs, 4), embed.proj.weight, embed.proj.bias) * weights).sum().backward()
    for got, expected in zip((imgs.grad, embed.proj.weight.grad, embed.proj.bias.grad), want):
        torch.testing.assert_close(got, expected)
    rows = torch.randn(1, 3, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: ops.embed_patches(x, w), (rows, weight))


def test_embed_patches_low_precision_and_no_bias():
    weight = torch.randn(8, 3, 4, 4, dtype=torch.bfloat16)
    rows = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    out = ops.embed_patches(rows, weight)
    assert out.shape == (2, 5, 8) and out.dtype == torch.bfloat16
    want = rows.float() @ weight.float().permute(0, 2, 3, 1).reshape(8, 48).T
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_embed_patches_under_autocast_takes_fp32_weights(dtype):
    # mixed precision: rows in the autocast dtype (mix_patchify's out_dtype, as the README writes it) meet
    # the fp32 master weights; timm's PatchEmbed takes such images, embed_patches raised a TypeError
    embed = PatchEmbed(img_size=(8, 12), patch_size=4, in_chans=3, embed_dim=16)
    imgs = torch.randn(2, 3, 8, 12).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        want = embed(imgs)
        got = ops.embed_patches(ops.patchify(imgs, 4), embed.proj.weight, embed.proj.bias)
        with pytest.raises(TypeError, match="proj_weight"):  # autocast never casts float64
            ops.embed_patches(ops.patchify(imgs.double(), 4), embed.proj.weight)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="proj_weight"):  # outside autocast the dtypes must still agree
        ops.embed_patches(ops.patchify(imgs, 4), embed.proj.weight)


@pytest.mark.parametrize("args,err,match", [
    ((torch.randn(2, 5, 48), torch.randn(8, 3, 4, 4), torch.randn(7)), ValueError, "proj_bias"),
    ((torch.randn(2, 5, 40), torch.randn(8, 3, 4, 4)), ValueError, "p\\*p\\*C = 48"),
    ((torch.randn(2, 5, 48), torch.randn(8, 3, 4, 3)), ValueError, "square"),
    # an empty kernel used to give the bias alone (Conv2d refuses it)
    ((torch.randn(2, 5, 0), torch.randn(8, 3, 0, 0), torch.randn(8)), ValueError, "C, p >= 1"),
    ((torch.randn(2, 5, 0), torch.randn(8, 0, 4, 4), torch.randn(8)), ValueError, "C, p >= 1"),
    ((torch.randn(2, 5, 48), torch.randn(8, 48)), ValueError, "proj_weight"),
    ((torch.randn(10, 48), torch.randn(8, 3, 4, 4)), ValueError, "inputs"),
    ((torch.randn(2, 5, 48), torch.randn(8, 3, 4, 4, dtype=torch.float64)), TypeError, "proj_weight"),
    ((torch.randn(2, 5, 48), torch.randn(8, 3, 4, 4).int()), TypeError, "proj_weight"),
    ((torch.randn(2, 5, 48).half(), torch.randn(8, 3, 4, 4)), TypeError, "proj_weight"),
    ((torch.randn(2, 5, 48), torch.randn(8, 3, 4, 4), torch.randn(8).half()), TypeError, "proj_bias"),
    ((torch.zeros(2, 5, 48, dtype=torch.uint8), torch.randn(8, 3, 4, 4)), TypeError, "inputs"),
    # a meta weight used to give meta tokens, a meta bias a RuntimeError from F.linear
    ((torch.randn(2, 5, 48), torch.randn(8, 3, 4, 4, device="meta")), ValueError, "device"),
    ((torch.randn(2, 5, 48), torch.randn(8, 3, 4, 4), torch.randn(8, device="meta")), ValueError, "device"),
])
def test_embed_patches_rejects(args, err, match):
    with pytest.raises(err, match=match):
        ops.embed_patches(*args)


def test_embed_patches_compiles():
    weight = torch.randn(8, 1, 4, 4, requires_grad=True)
    rows = torch.randn(2, 3, 16)
    compiled = torch.compile(ops.embed_patches, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(rows, weight), ops.embed_patches(rows, weight))


@pytest.mark.gpu
def test_embed_patches_gpu_bf16():
    assert HAS_CUDA
    embed = PatchEmbed(img_size=224, patch_size=16, in_chans=3, embed_dim=768).cuda().bfloat16()
    imgs = torch.randn(4, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    got = ops.embed_patches(ops.patchify(imgs, 16), embed.proj.weight, embed.proj.bias)
    torch.testing.assert_close(got.float(), embed(imgs).float(), atol=0.1, rtol=3e-2)
