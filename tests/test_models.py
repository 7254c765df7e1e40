"""Models: presets, MAE against a plain MAE, i-MAE's mixing/teacher/branches, Self-guided MAE's informed
phase, backends, torch.compile, checkpoints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_accelerate import PlainMAE

from maskedssl.models import (IMAE, MAE, PRESETS, IMAEConfig, MAEConfig, ModelConfig, ModelOutput,
                              SelfGuidedMAE, build_model)
from maskedssl.models.sgmae import SGMAEConfig
from maskedssl.ops import normalize_rows, patchify

SMALL = [name for name in PRESETS if not name.startswith(("vit_base", "vit_large"))]


def planted_images(batch: int = 2, size: int = 32, patch: int = 4, seed: int = 0):
    """Noisy background with a bright square object covering 4x4 patches; returns (imgs, object patches)."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch, 3, size, size, generator=g) * 0.1 - 1.0
    grid = size // patch
    objects = torch.zeros(batch, grid, grid, dtype=torch.bool)
    for b in range(batch):
        r, c = torch.randint(0, grid - 3, (2,), generator=g).tolist()
        imgs[b, :, r * patch:(r + 4) * patch, c * patch:(c + 4) * patch] += 2.5
        objects[b, r:r + 4, c:c + 4] = True
    return imgs, objects.flatten(1)


def _seeded(fn, seed=3):
    torch.manual_seed(seed)
    return fn()


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", SMALL)
def test_every_small_preset_runs_one_step(preset):
    arch = PRESETS[preset]
    model = build_model("mae", preset)
    imgs = torch.randn(1, arch.in_chans, arch.img_size, arch.img_size)
    with torch.no_grad():  # the backward pass is tested on micro; here the shapes and values
        out = model(imgs)
    assert isinstance(out, ModelOutput) and torch.isfinite(out.loss)
    assert out.mask.shape == (1, arch.num_patches)
    assert int(out.mask.sum()) == arch.num_patches - int(arch.num_patches * 0.25)
    # MAE's decoder shape (512 wide, 8 blocks, 16 heads), as the size presets promise; micro is the tests'
    if preset != "micro":
        assert (arch.decoder_embed_dim, arch.decoder_depth, arch.decoder_num_heads) == (512, 8, 16)


@pytest.mark.parametrize("preset,timm_name", [("vit_base", "vit_base_patch16_224"),
                                              ("vit_large", "vit_large_patch16_224")])
def test_big_presets_have_the_official_encoder_size(preset, timm_name):
    import timm

    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        ours = build_model("mae", preset)
        reference = timm.create_model(timm_name, num_classes=0)
    encoder = sum(p.numel() for name, p in ours.named_parameters()
                  if not name.startswith(("decoder", "mask_")))
    assert encoder == sum(p.numel() for p in reference.parameters())
    assert ours.num_patches == 196 and ours.decoder_pred.out_features == 16 * 16 * 3
    assert (ours.config.arch.decoder_embed_dim, ours.config.arch.decoder_depth) == (512, 8)


def test_build_model_options_and_errors():
    model = build_model("sgmae", "micro", mask_ratio=0.5, in_chans=1, hint_ratio=0.0, sg_layer=1)
    assert model.config.mask_ratio == 0.5 and model.in_chans == 1 and model.config.sg_layer == 1
    assert model.mean.shape == (1,) and "mean" not in model.state_dict()
    assert torch.isfinite(model(torch.randn(2, 1, 32, 32), progress=1.0).loss)
    with pytest.raises(TypeError, match="hint_ratio"):
        build_model("mae", "micro", hint_ratio=0.1)
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("mae", "vit_huge")
    with pytest.raises(ValueError, match="unknown method"):
        build_model("simmim")
    with pytest.raises(ValueError, match="divisible"):
        build_model("mae", "micro", img_size=30)
    with pytest.raises(ValueError, match="partner"):
        build_model("mae")(torch.randn(2, 3, 32, 32), partner=torch.tensor([1, 0]), lam=0.5)



@pytest.mark.parametrize("method", ["mae", "imae", "sgmae"])
def test_images_of_another_size_or_channel_count_are_a_value_error(method):
    """A 48 px image patchifies to 144 rows, which the 64-patch masks index in range: it used to train
    silently on the wrong patches (forward_features and reconstruct failed deep inside instead)."""
    model = build_model(method, "micro")
    for shape in [(2, 3, 48, 48), (2, 3, 32, 48), (2, 1, 32, 32), (3, 32, 32)]:
        imgs = torch.randn(shape)
        for call in (lambda: model(imgs, progress=1.0), lambda: model.forward_features(imgs),
                     lambda: model.reconstruct(imgs, progress=1.0)):
            with pytest.raises(ValueError, match=r"imgs must be \(B, 3, 32, 32\)"):
                call()


@pytest.mark.parametrize("method", ["mae", "imae", "sgmae"])
def test_progress_must_be_a_fraction(method):
    """NaN compared as past Self-guided MAE's warm-up (informed masks), a string failed in a comparison."""
    model = build_model(method, "micro")
    imgs = torch.randn(2, 3, 32, 32)
    for progress, error in ((float("nan"), ValueError), (-0.1, ValueError), (1.5, ValueError),
                            ("a", TypeError), (None, TypeError), (True, TypeError)):
        for call in (lambda: model(imgs, progress=progress),
                     lambda: model.reconstruct(imgs, progress=progress)):
            with pytest.raises(error, match="progress"):
                call()


@pytest.mark.parametrize("method", ["mae", "imae", "sgmae"])
def test_mask_ratio_must_mask_and_keep_a_patch(method):
    """mask_ratio 0 masks nothing: the loss, a mean over the masked patches, was NaN at the first step."""
    for ratio in (0.0, 1.0, 63.5 / 64, -0.1, float("nan")):
        with pytest.raises(ValueError, match="mask_ratio"):
            build_model(method, "micro", mask_ratio=ratio)
    with pytest.raises(TypeError, match="mask_ratio"):
        build_model(method, "micro", mask_ratio="0.5")
    for ratio in (1 / 64, 63 / 64):  # M = 1 and K = 1
        model = build_model(method, "micro", mask_ratio=ratio)
        out = model(torch.randn(3, 3, 32, 32), progress=1.0)
        assert torch.isfinite(out.loss)
        assert out.mask.sum(1).tolist() == [64 - int(64 * (1 - ratio))] * 3


def test_architecture_values_are_checked_by_name():
    for field, value in [("patch_size", 0), ("img_size", 0), ("embed_dim", -4), ("depth", -1),
                         ("mlp_ratio", -1.0), ("mlp_ratio", float("nan"))]:
        with pytest.raises(ValueError, match=field):
            build_model("mae", "micro", **{field: value})
    with pytest.raises(TypeError, match="patch_size"):
        build_model("mae", "micro", patch_size=4.0)
    # the models skip mix_patchify's value checks, so a zero std gave NaN losses
    with pytest.raises(ValueError, match="std"):
        build_model("mae", "micro", std=(0.0, 0.2, 0.2))
    with pytest.raises(ValueError, match="mean"):
        build_model("mae", "micro", mean=(float("nan"), 0.5, 0.5))
    with pytest.raises(TypeError, match="norm_pix_loss"):
        build_model("mae", "micro", norm_pix_loss="no")


@pytest.mark.parametrize("method", ["mae", "imae", "sgmae"])
def test_uint8_images_are_normalised_with_the_model_statistics(method):
    """A uint8 batch (what the trainer hands over when the CPU has cropped it) gives the loss of the same
    batch normalised first, as data.normalize_batch does; Self-guided MAE past its warm-up, so its informed
    masks come from the uint8 pixels too."""
    model = build_model(method, "micro", norm_pix_loss=False)
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    normalised = (u8.float() / 255 - model.mean.view(1, -1, 1, 1)) / model.std.view(1, -1, 1, 1)
    progress = 1.0 if method == "sgmae" else 0.0
    assert torch.equal(_seeded(lambda: model(u8, progress=progress).loss),
                       _seeded(lambda: model(normalised, progress=progress).loss))


# ----------------------------------------------------------------------------- MAE
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mae_matches_a_plain_mae_with_the_same_weights_and_mask(norm_pix_loss):
    plain = PlainMAE(norm_pix_loss=norm_pix_loss)
    ours = build_model("mae", "micro", norm_pix_loss=norm_pix_loss)
    ours.load_state_dict(plain.state_dict())  # strict: the parameter names are MAE's
    imgs = torch.randn(3, 3, 32, 32)
    ref_loss, _, ref_mask = _seeded(lambda: plain(imgs, 0.75))
    out = _seeded(lambda: ours(imgs))
    assert torch.equal(out.mask, ref_mask)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=1e-5)


def test_features_and_pictures():
    model = build_model("mae", "micro").eval()
    imgs = torch.randn(2, 3, 32, 32)
    assert model.forward_features(imgs).shape == (2, 65, 96)
    torch.testing.assert_close(model.forward_features(imgs, pool="mean"),
                               model.forward_features(imgs)[:, 1:].mean(1))
    pics = model.reconstruct(imgs)
    assert set(pics) == {"input", "masked", "reconstruction"}
    for pic in pics.values():
        assert pic.shape == (2, 3, 32, 32) and 0 <= pic.min() and pic.max() <= 1
    with pytest.raises(ValueError, match="pool"):
        model.forward_features(imgs, pool="max")


def test_from_official_round_trip_and_errors(tmp_path):
    plain = PlainMAE()  # official names, official layout
    path = tmp_path / "checkpoint-0.pth"
    torch.save({"model": plain.state_dict(), "epoch": 0}, path)
    loaded = MAE.from_official(path)  # preset found from the shapes: micro
    assert loaded.config.arch == PRESETS["micro"]
    for name, value in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name

    encoder_only = {k: v for k, v in plain.state_dict().items()
                    if not k.startswith(("decoder", "mask_token"))}
    torch.save(encoder_only, path)
    with pytest.raises(ValueError, match=r"missing keys \[decoder_blocks.0.attn.proj.bias, .* 24 more\]"):
        MAE.from_official(path)
    assert torch.equal(MAE.from_official(path, strict=False).cls_token, plain.cls_token)

    wrong = dict(plain.state_dict(), extra_head=torch.zeros(1))
    del wrong["norm.bias"]
    torch.save(wrong, path)
    with pytest.raises(ValueError, match=r"missing keys \[norm.bias\]; unexpected keys \[extra_head\]"):
        MAE.from_official(path, preset="micro")
    with pytest.raises(ValueError, match=r"wrong shapes \[blocks.0.attn.proj.bias \(96,\) \(expected "
                                         r"\(128,\)\).*more\]"):
        torch.save(plain.state_dict(), path)
        MAE.from_official(path, preset="micro", embed_dim=128, num_heads=4)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        MAE.from_official(path)
    # a facebookresearch/mae training checkpoint: its argparse options under 'args' are not loaded (that
    # would run the file's pickled code); the error says so in one line, and what to do
    import argparse

    torch.save({"model": plain.state_dict(), "args": argparse.Namespace(lr=1e-3)}, path)
    with pytest.raises(ValueError, match=r"argparse\.Namespace object.*'model' entry alone") as err:
        MAE.from_official(path)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError):
        MAE.from_official(tmp_path / "absent.pth")


# ----------------------------------------------------------------------------- i-MAE
class Recorder:
    """Wraps a bound method, records its calls, calls through."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs, torch.is_grad_enabled()))
        return self.fn(*args, **kwargs)


def _rows(imgs, ids, norm=False):
    rows = patchify(imgs, 4)
    rows = normalize_rows(rows) if norm else rows
    return rows.gather(1, ids[..., None].expand(-1, -1, rows.shape[-1]))


def test_imae_teacher_sees_the_unmixed_images_and_targets_follow_the_subordinate(monkeypatch):
    teacher = build_model("mae", "micro")
    model = build_model("imae", "micro", teacher=teacher)
    # heads start as the teacher's decoder_embed
    assert torch.equal(model.sub_head.weight, teacher.decoder_embed.weight)
    assert torch.equal(model.dom_head.bias, teacher.decoder_embed.bias)
    imgs = torch.randn(3, 3, 32, 32)
    partner = torch.tensor([1, 2, 0])
    lam = torch.tensor([0.2, 0.8, 0.5])  # imgs[b] weighs lam: subordinate = own, partner, partner
    teacher_encode = Recorder(teacher.encode)
    monkeypatch.setattr(teacher, "encode", teacher_encode)
    student_encode, decode = Recorder(model.encode), Recorder(model.decode)
    monkeypatch.setattr(model, "encode", student_encode)
    monkeypatch.setattr(model, "decode", decode)
    import maskedssl.models.imae as imae

    mse_calls = Recorder(imae.mse)
    monkeypatch.setattr(imae, "mse", mse_calls)
    out = model(imgs, partner=partner, lam=lam)
    assert set(out.losses) == {"rec_sub", "rec_dom", "distill_sub", "distill_dom", "loss"}
    torch.testing.assert_close(out.extras["sub_weight"], torch.tensor([0.2, 0.2, 0.5]))

    (student_rows, ids_keep), _, _ = student_encode.calls[0]
    mixture = lam.view(-1, 1, 1, 1) * imgs + (1 - lam.view(-1, 1, 1, 1)) * imgs[partner]
    torch.testing.assert_close(student_rows, _rows(mixture, ids_keep))

    # the teacher: one batched, no-grad call on [imgs ; imgs[partner]], same mask as the student
    assert len(teacher_encode.calls) == 1
    (teacher_rows, teacher_ids), _, grad_enabled = teacher_encode.calls[0]
    assert not grad_enabled
    assert torch.equal(teacher_ids, torch.cat([ids_keep, ids_keep]))
    torch.testing.assert_close(teacher_rows,
                               torch.cat([_rows(imgs, ids_keep), _rows(imgs[partner], ids_keep)]))

    # one decoder call on both branches
    assert len(decode.calls) == 1 and decode.calls[0][0][0].shape[0] == 6

    sub_imgs = torch.where((lam >= 0.5).view(-1, 1, 1, 1), imgs[partner], imgs)
    dom_imgs = torch.where((lam >= 0.5).view(-1, 1, 1, 1), imgs, imgs[partner])
    ids_masked = decode.calls[0][0][2][:3]  # the rows predicted: the masked ones, as the loss orders them
    assert torch.equal(out.mask.gather(1, ids_masked), torch.ones(3, 48))
    (_, target_sub), _, _ = mse_calls.calls[0]
    (_, target_dom), _, _ = mse_calls.calls[1]
    torch.testing.assert_close(target_sub, _rows(sub_imgs, ids_masked, norm=True))
    torch.testing.assert_close(target_dom, _rows(dom_imgs, ids_masked, norm=True))

    with torch.no_grad():
        latent_t = teacher.decoder_embed(teacher.encode(teacher_rows, teacher_ids))
    own_t, partner_t = latent_t.chunk(2)
    (_, distill_sub), _, _ = mse_calls.calls[2]
    expected = torch.where((lam >= 0.5).view(-1, 1, 1), partner_t, own_t)
    torch.testing.assert_close(distill_sub, expected)

    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.sub_head.weight.grad is not None


def test_imae_lam_sampling_modes_and_no_teacher():
    imgs = torch.randn(4, 3, 32, 32)
    batch = build_model("imae", "micro")
    out = batch(imgs)
    assert set(out.losses) == {"rec_sub", "rec_dom", "loss"}
    assert torch.unique(out.extras["lam"]).numel() == 1
    assert out.extras["partner"].sort().values.tolist() == [0, 1, 2, 3]
    # the default partners: a permutation without an image mixed with itself (randperm left ~1 a batch)
    for _ in range(20):
        for partner in (batch(imgs).extras["partner"], batch(imgs, lam=0.3).extras["partner"]):
            assert partner.sort().values.tolist() == [0, 1, 2, 3] and (partner != torch.arange(4)).all()
    lam = build_model("imae", "micro", lam_mode="sample")(imgs).extras["lam"]
    assert torch.unique(lam).numel() == 4 and ((lam >= 0) & (lam <= 1)).all()
    pics = batch.reconstruct(imgs, partner=torch.tensor([1, 0, 3, 2]), lam=0.3)
    assert set(pics) == {"mixture", "masked", "sub", "dom", "recon_sub", "recon_dom"}
    torch.testing.assert_close(pics["sub"], batch.to_pixels(patchify(imgs, 4)))
    with pytest.raises(ValueError, match="lam_mode"):
        build_model("imae", "micro", lam_mode="epoch")
    with pytest.raises(TypeError, match="lam_mode"):
        build_model("imae", "micro", lam_mode=1)
    with pytest.raises(ValueError, match="decoder_embed_dim"):
        build_model("imae", "micro", teacher=build_model("mae", "micro", decoder_embed_dim=128))
    assert isinstance(batch, IMAE) and isinstance(batch.config, IMAEConfig)



def test_imae_caller_lam_and_partner_errors_name_the_argument():
    model = build_model("imae", "micro")
    imgs, partner = torch.randn(3, 3, 32, 32), torch.tensor([1, 2, 0])
    # a float, a 0-d tensor, a (1,) or a (B,) tensor of any float dtype: the same weights
    for lam in (0.3, torch.tensor(0.3), torch.tensor([0.3]), torch.full((3,), 0.3, dtype=torch.float64)):
        out = model(imgs, partner=partner, lam=lam)
        torch.testing.assert_close(out.extras["lam"], torch.full((3,), 0.3))
    # a wrong length or rank was a RuntimeError from expand; bools, strings and integer tensors were
    # silently turned into weights
    for lam in (torch.tensor([0.1, 0.2]), torch.tensor([[0.1, 0.2, 0.3]])):
        for call in (model, model.reconstruct):
            with pytest.raises(ValueError, match="lam"):
                call(imgs, partner=partner, lam=lam)
    for lam in (True, "0.3", torch.tensor([0, 1, 1])):
        with pytest.raises(TypeError, match="lam"):
            model(imgs, partner=partner, lam=lam)
    for lam in (1.5, -0.1, float("nan"), torch.tensor([0.1, 1.5, 0.3])):
        with pytest.raises(ValueError, match="lam"):
            model(imgs, partner=partner, lam=lam)
    for bad in (torch.tensor([1, 0]), torch.tensor([1, 2, 3]), torch.tensor([1, 2, -1])):
        with pytest.raises(ValueError, match="partner"):
            model(imgs, partner=bad, lam=0.3)
    with pytest.raises(TypeError, match="partner"):
        model(imgs, partner=torch.tensor([1.0, 2.0, 0.0]), lam=0.3)


def test_imae_config_and_teacher_are_checked():
    for option in ("lam_alpha", "rec_sub_weight", "distill_dom_weight"):
        with pytest.raises(ValueError, match=option):  # NaN passed `<= 0` checks; Beta(nan) failed later
            build_model("imae", "micro", **{option: float("nan")})
    with pytest.raises(ValueError, match="rec_dom_weight"):
        build_model("imae", "micro", rec_dom_weight=-1.0)
    with pytest.raises(TypeError, match="teacher"):
        build_model("imae", "micro", teacher="runs/mae/checkpoint.pt")
    # the teacher's rows are normalised with the student's statistics: a teacher trained on others is refused
    for stats in (dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), dict(std=(0.2, 0.2, 0.2))):
        with pytest.raises(ValueError, match="teacher normalises pixels"):
            build_model("imae", "micro", teacher=build_model("mae", "micro", **stats))
    same = build_model("mae", "micro", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert build_model("imae", "micro", teacher=same).teacher is same  # the default statistics, spelt out


# ----------------------------------------------------------------------------- Self-guided MAE
def test_sgmae_option_types_are_checked():
    """A string warmup_frac failed on a bare '<=' TypeError; "no" for center_features was taken as True."""
    for option, value in (("warmup_frac", "0.1"), ("sg_layer", 1.0), ("center_features", "no")):
        with pytest.raises(TypeError, match=option):
            build_model("sgmae", "micro", **{option: value})
    # the masking options are checked when the config is made, not only when a model is built from it
    from maskedssl.models.sgmae import SGMAEConfig
    from maskedssl.models.vit import make_config

    for option, value, error in (("hint_ratio", 5.0, ValueError), ("eps", 0.0, ValueError),
                                 ("tau", "0.2", TypeError), ("tau", 1.0, ValueError)):
        with pytest.raises(error, match=option):
            make_config(SGMAEConfig, "micro", **{option: value})


@pytest.mark.parametrize("warmup_frac, informed_from", [(0.0, 0.0), (0.25, 0.25), (1.0, 1.0)])
def test_sgmae_switches_to_informed_masks_exactly_at_warmup_frac(warmup_frac, informed_from):
    model = build_model("sgmae", "micro", warmup_frac=warmup_frac, depth=1, decoder_depth=1)
    imgs = torch.randn(1, 3, 32, 32)
    for progress in (0.0, 0.2499, 0.25, 0.5, 0.9999, 1.0):
        out = model(imgs, progress=progress)
        assert out.extras["informed"] is (progress >= informed_from), progress
        assert torch.isfinite(out.loss) and out.mask.sum().item() == 48


def test_sgmae_random_during_warmup_then_informed():
    model = build_model("sgmae", "micro", warmup_frac=0.25, hint_ratio=0.0, sg_layer=0)
    mae = build_model("mae", "micro")
    mae.load_state_dict(model.state_dict())
    imgs, objects = planted_images(4)
    warm = _seeded(lambda: model(imgs, progress=0.1))
    assert warm.extras["informed"] is False
    assert torch.equal(warm.mask, _seeded(lambda: mae(imgs)).mask)
    informed = model(imgs, progress=0.25)
    assert informed.extras["informed"] is True and torch.isfinite(informed.loss)
    assert (informed.mask.sum(1) == 48).all()
    # even untrained, the patch embeddings separate a bright square from a dark background
    assert informed.mask.bool()[objects].all()
    assert informed.extras["ncut"].foreground.shape == (4, 64)
    assert isinstance(model, SelfGuidedMAE) and isinstance(model.config, MAEConfig)


def test_sgmae_informed_masks_on_the_embedded_synthetic_data():
    data = pytest.importorskip("maskedssl.data")
    n = 32
    dataset = data.build_dataset(f"synthetic:{n}", train=True, img_size=32)
    imgs = torch.stack([dataset[i][0] for i in range(n)])
    objects = torch.stack([dataset.object_mask(i) for i in range(n)])  # (n, 32, 32) pixels
    object_patches = objects.view(n, 8, 4, 8, 4).float().mean((2, 4)).flatten(1) >= 0.5
    model = build_model("sgmae", "micro", warmup_frac=0.0, hint_ratio=0.0, sg_layer=0)
    out = model(imgs, progress=1.0)
    foreground = out.extras["ncut"].foreground
    iou = ((foreground & object_patches).sum() / (foreground | object_patches).sum()).item()
    covered = (out.mask.bool() & object_patches).sum().item() / object_patches.sum().item()
    print(f"untrained micro, sg_layer=0: foreground IoU with the objects {iou:.3f}, "
          f"object patches masked {covered:.3f} (random masks: 0.75)")
    assert iou > 0.3  # all patches as foreground would score the object fraction, about 0.15
    # informed masks take the object first: random masks would cover about the mask ratio (0.75) of it
    assert covered > 0.9


# ----------------------------------------------------------------------------- backends and compile
def _method_step(method, **arch):
    kwargs = dict(arch)
    if method == "imae":
        kwargs["teacher"] = build_model("mae", "micro", **arch)
    model = build_model(method, "micro", **kwargs)
    imgs, _ = planted_images(2)
    call = {"partner": torch.tensor([1, 0]), "lam": torch.tensor([0.3, 0.7])} if method == "imae" else \
        {"progress": 1.0}
    return model, imgs, call


@pytest.mark.parametrize("method", ["mae", "imae", "sgmae"])
def test_triton_backend_gives_the_torch_loss(method, monkeypatch):
    model, imgs, call = _method_step(method)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MASKEDSSL_BACKEND", backend)
        model.zero_grad()
        out = _seeded(lambda: model(imgs, **call))
        out.loss.backward()
        grads = model.patch_embed.proj.weight.grad.clone(), model.decoder_pred.weight.grad.clone()
        results[backend] = out, *grads
    (ref, *ref_grads), (got, *got_grads) = results["torch"], results["triton"]
    assert torch.equal(got.mask, ref.mask)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["mae", "imae", "sgmae"])
def test_training_step_compiles_without_graph_breaks(method):
    model, imgs, call = _method_step(method, depth=1, decoder_depth=1)  # a small graph compiles faster
    compiled = torch.compile(lambda x: model(x, **call).loss, fullgraph=True, backend="aot_eager")
    loss = _seeded(lambda: compiled(imgs))
    torch.testing.assert_close(loss, _seeded(lambda: model(imgs, **call).loss), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_model_config_is_a_frozen_dataclass():
    model = build_model("mae", "micro")
    assert isinstance(model.config.arch, ModelConfig)
    with pytest.raises(Exception):
        model.config.mask_ratio = 0.5
    # a list of statistics is kept as a tuple: the frozen config stays hashable (hash() raised)
    arch = ModelConfig(img_size=32, patch_size=4, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    assert arch.std == (0.25, 0.25, 0.25) and hash(arch) == hash(dataclasses.replace(arch))
    config = MAEConfig(mask_ratio=np.float32(0.75))  # a numpy ratio, stored as a float
    assert type(config.mask_ratio) is float and config.mask_ratio == 0.75


def test_a_config_of_the_wrong_kind_is_a_type_error():
    """Each failed later with an AttributeError ('arch', 'hint_ratio', or 'lam_alpha' at the first step)."""
    for make, match in [(lambda: MAE("micro"), "MAEConfig"), (lambda: MAE(PRESETS["micro"]), "MAEConfig"),
                        (lambda: IMAE(MAEConfig()), "IMAEConfig"),
                        (lambda: SelfGuidedMAE(MAEConfig()), "SGMAEConfig"),
                        (lambda: SelfGuidedMAE(IMAEConfig()), "SGMAEConfig"),
                        (lambda: MAEConfig(arch="micro"), "arch")]:
        with pytest.raises(TypeError, match=match):
            make()
    assert type(MAE(SGMAEConfig())) is MAE  # a subclass config is still an MAE config


def test_an_empty_batch_is_a_value_error_in_every_phase():
    empty = torch.randn(0, 3, 32, 32)
    for method, progress in (("mae", 0.0), ("imae", 0.0), ("sgmae", 0.0), ("sgmae", 1.0)):
        with pytest.raises(ValueError):  # the informed phase returned a NaN loss
            build_model(method, "micro")(empty, progress=progress)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["mae", "imae", "sgmae"])
def test_gpu_backends_give_the_torch_loss(method, monkeypatch):
    from conftest import gpu_kernel_backends

    model, imgs, call = _method_step(method)
    model, imgs = model.cuda(), imgs.cuda()
    call = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    results = {}
    for backend in ("torch", *gpu_kernel_backends()):
        monkeypatch.setenv("MASKEDSSL_BACKEND", backend)
        results[backend] = _seeded(lambda: model(imgs, **call))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = _seeded(lambda: model(imgs, **call))
        out.loss.backward()
        assert torch.isfinite(out.loss)
    for backend, out in results.items():
        assert torch.equal(out.mask, results["torch"].mask), backend
        torch.testing.assert_close(out.loss, results["torch"].loss, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["mae", "imae", "sgmae"])
def test_a_training_step_makes_no_index_check_syncs(method, monkeypatch):
    """The models' masks are valid by construction: their op calls skip the range checks (each a
    device->host sync); only indices a caller passes in are checked."""
    model = build_model(method, "micro")
    imgs = torch.rand(2, 3, 32, 32)
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: calls.append(t.shape) or real(t))
    model(imgs, progress=1.0).loss.backward()
    assert calls == []
    if method == "imae":
        model(imgs, partner=torch.tensor([1, 0]), lam=torch.tensor([0.3, 0.6]))
        # the caller's partner and lam are checked once each; the model's own masks were checked too (4)
        assert len(calls) == 2
