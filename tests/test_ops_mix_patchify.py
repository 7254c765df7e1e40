"""mix_patchify kernels (Triton, CUDA) against the torch backend, for every option combination.

CPU: the Triton kernel under TRITON_INTERPRET=1 on small shapes. GPU-marked: Triton and CUDA on CUDA
tensors, same matrix plus the headline shapes and every supported patch size.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import DTYPES, HAS_CUDA, assert_close, cpu_kernel_backends, gpu_kernel_backends

from maskedssl import ops

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# How imgs arrive: float dtypes as they are, uint8 raw (scaled to [0, 1]) or with mean/std applied.
INPUT_KINDS = ["float32", "bfloat16", "float16", "uint8", "uint8+meanstd"]


def make_case(kind, *, b=3, c=3, height=12, width=20, p=4, mix=True, ids=True, index_dtype=torch.int64,
              device="cpu", mask_ratio=0.6):
    """imgs and the keyword arguments of one mix_patchify call."""
    if kind.startswith("uint8"):
        imgs = torch.randint(0, 256, (b, c, height, width), dtype=torch.uint8, device=device)
    else:
        imgs = torch.randn(b, c, height, width, device=device).to(getattr(torch, kind))
    kwargs = {}
    if kind == "uint8+meanstd":
        kwargs.update(mean=torch.tensor(MEAN[:c], device=device), std=torch.tensor(STD[:c], device=device))
    if mix:
        kwargs.update(partner=torch.randint(0, b, (b,), device=device).to(index_dtype),
                      lam=torch.rand(b, device=device))
    if ids:
        length = (height // p) * (width // p)
        ids_keep, ids_restore, _ = ops.random_masking(b, length, mask_ratio, device=device)
        ids_masked = torch.argsort(ids_restore, dim=1)[:, ids_keep.shape[1]:]
        kwargs.update(ids_keep=ids_keep.to(index_dtype), ids_masked=ids_masked.to(index_dtype))
    return imgs, kwargs


def check_against_torch(backend, imgs, p, **kwargs):
    got_inputs, got_targets = ops.mix_patchify(imgs, p, backend=backend, **kwargs)
    want_inputs, want_targets = ops.mix_patchify(imgs, p, backend="torch", **kwargs)
    assert got_inputs.dtype == want_inputs.dtype and got_inputs.shape == want_inputs.shape
    assert len(got_targets) == len(want_targets) == (2 if "partner" in kwargs else 1)
    assert_close(got_inputs, want_inputs)
    for got, want in zip(got_targets, want_targets):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_close(got, want)
    return got_inputs, got_targets


MATRIX = list(itertools.product(INPUT_KINDS, [False, True], [False, True], [False, True]))


def _matrix_params(backends):
    # out_dtype rotates through float32/bfloat16/float16 so the 40 (kind, mix, ids, norm_pix) cases see
    # every output dtype without multiplying the count by three.
    return [pytest.param(backend, *case, DTYPES[i % 3],
                         id=f"{backend}-{'-'.join(map(str, case))}-{str(DTYPES[i % 3])[6:]}")
            for backend in backends for i, case in enumerate(MATRIX)]


@pytest.mark.parametrize("backend,kind,mix,ids,norm_pix,out_dtype", _matrix_params(cpu_kernel_backends()))
def test_matches_torch(backend, kind, mix, ids, norm_pix, out_dtype):
    imgs, kwargs = make_case(kind, mix=mix, ids=ids, index_dtype=torch.int32 if mix else torch.int64)
    check_against_torch(backend, imgs, 4, norm_pix=norm_pix, out_dtype=out_dtype, **kwargs)


@pytest.mark.parametrize("backend", cpu_kernel_backends())
@pytest.mark.parametrize("p,c,height,width", [(2, 3, 4, 6), (4, 1, 12, 20), (8, 3, 16, 8), (14, 3, 28, 14),
                                              (16, 1, 16, 32), (16, 3, 32, 16)])
def test_patch_sizes_and_odd_images(backend, p, c, height, width):
    imgs, kwargs = make_case("float32", b=2, c=c, height=height, width=width, p=p, mask_ratio=0.5)
    check_against_torch(backend, imgs, p, **kwargs)


@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_non_contiguous_images(backend):
    base = torch.randint(0, 256, (2, 14, 22, 3), dtype=torch.uint8)
    views = {
        "channels_last": base[:, 1:13, 1:21].permute(0, 3, 1, 2),  # (B, C, H, W) view of (B, H, W, C)
        "sliced": torch.rand(3, 4, 16, 24)[:2, 1:, 2:14, 2:22],
        "transposed": torch.rand(2, 3, 20, 12).transpose(2, 3),
    }
    for imgs in views.values():
        assert not imgs.is_contiguous()
        _, kwargs = make_case("float32", b=2)
        kwargs.update(mean=torch.tensor(MEAN), std=torch.tensor(STD))
        check_against_torch(backend, imgs, 4, **kwargs)


@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_batch_one_partner_self_and_exact_ends(backend):
    imgs, kwargs = make_case("float32", b=1)
    kwargs.update(partner=torch.zeros(1, dtype=torch.long), lam=torch.tensor([0.3]))
    inputs, (target, other) = check_against_torch(backend, imgs, 4, **kwargs)
    plain = ops.patchify(imgs, 4)[0, kwargs["ids_keep"][0]]
    assert torch.equal(inputs[0], plain) and torch.equal(target, other)
    # lam = 1 gives the sample, lam = 0 its partner, bit for bit.
    imgs = torch.randn(2, 3, 12, 20)
    rows = ops.patchify(imgs, 4)
    for lam, want in ((1.0, rows), (0.0, rows.flip(0))):
        inputs, _ = ops.mix_patchify(imgs, 4, partner=torch.tensor([1, 0]), lam=lam, backend=backend)
        assert torch.equal(inputs, want)


@pytest.mark.parametrize("backend", cpu_kernel_backends())
def test_casts_round_as_torch(backend):
    # Without mixing or normalising, each output is one cast of one pixel: bit-identical to torch's casts.
    # fp32 -> bf16 rounds to nearest even (1 + 2^-8 + 2^-10 rounds up; the Triton interpreter's own cast
    # truncates it), and bf16 subnormal pixels widen exactly (its own widening does not).
    ulp = 2.0 ** -7
    values = torch.tensor([1 + 2**-8 + 2**-10, 1 + ulp / 2, 1 + ulp * 1.5, -(1 + ulp * 0.75), 3e-39, -1e-40,
                           float("inf"), 0.0, 2.0 ** -130, 1.7e38])
    imgs = values.repeat(8)[:64].view(1, 1, 8, 8)
    cases = [(imgs, torch.bfloat16), (imgs, torch.float16), (imgs.bfloat16(), torch.float32),
             (imgs.bfloat16(), torch.bfloat16), (imgs.half(), torch.float32)]
    for src, out_dtype in cases:
        ids = dict(ids_keep=torch.tensor([[3, 0]]), ids_masked=torch.tensor([[1, 2, 0]]))
        got_inputs, (got_target,) = ops.mix_patchify(src, 4, norm_pix=False, out_dtype=out_dtype, **ids,
                                                     backend=backend)
        want_inputs, (want_target,) = ops.mix_patchify(src, 4, norm_pix=False, out_dtype=out_dtype, **ids,
                                                       backend="torch")
        for got, want in ((got_inputs, want_inputs), (got_target, want_target)):
            bits = [t.float().view(torch.int32) for t in (got, want)]
            assert torch.equal(*bits), (src.dtype, out_dtype, got.view(-1)[:10], want.view(-1)[:10])


@pytest.mark.skipif("cuda" not in cpu_kernel_backends(), reason="the CUDA emulator is off")
def test_cuda_hands_patches_it_cannot_hold_to_the_next_backend(caplog):
    # p = 27 at C = 3: 2187 values, past 8 per thread of the 255 threads a multiple of 3 gives; C = 300: more
    # channels than threads. Each says its own reason, and the result is the torch backend's.
    for p, c, reason in ((27, 3, "p*p*C = 2187 values are too long"), (1, 300, "C = 300 channels exceed")):
        imgs = torch.randn(2, c, 2 * p, p)
        with caplog.at_level("WARNING"):
            got = ops.mix_patchify(imgs, p, partner=torch.tensor([1, 0]), lam=0.3, backend="cuda")
        assert reason in caplog.text, caplog.text
        want = ops.mix_patchify(imgs, p, partner=torch.tensor([1, 0]), lam=0.3, backend="torch")
        assert_close(got[0], want[0])
        for got_t, want_t in zip(got[1], want[1], strict=True):
            assert_close(got_t, want_t)


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
def test_uint8_equals_normalising_first(backend):
    imgs, kwargs = make_case("uint8+meanstd", mix=True)
    mean, std = kwargs["mean"], kwargs["std"]
    floats = (imgs.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    rest = {k: v for k, v in kwargs.items() if k not in ("mean", "std")}
    got_inputs, got_targets = ops.mix_patchify(imgs, 4, backend=backend, **kwargs)
    want_inputs, want_targets = ops.mix_patchify(floats, 4, backend=backend, **rest)
    assert_close(got_inputs, want_inputs)
    for got, want in zip(got_targets, want_targets):
        assert_close(got, want)


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
@pytest.mark.parametrize("kind", ["float32", "uint8"])
def test_flat_patches_normalise_to_exact_zeros(backend, kind):
    # A constant patch has mean = its value and var = 0: its norm_pix target is 0. Computing the mean
    # first left its rounding error times 1/sqrt(1e-6), up to 2.4e-4 (value 2.9), different per backend.
    imgs, kwargs = make_case(kind, b=2, height=16, width=32, p=16, ids=False)
    imgs[:, :, :, :16] = 77 if kind == "uint8" else 2.9
    inputs, (target, other) = check_against_torch(backend, imgs, 16, **kwargs)
    assert torch.equal(target[:, 0], torch.zeros_like(target[:, 0]))
    assert torch.equal(other[:, 0], torch.zeros_like(other[:, 0]))
    assert target[:, 1].abs().max() > 0.5  # the random patch is normalised as before
    assert torch.equal(ops.normalize_rows(torch.full((3, 768), 0.7)), torch.zeros(3, 768))


def test_float64_and_scalar_lam_forms():
    imgs, kwargs = make_case("float32", b=2, mix=True)
    want_inputs, want_targets = ops.mix_patchify(imgs, 4, **kwargs)
    # float64 images, lam, mean/std run on the torch backend in float64, whatever backend was asked for
    for backend in ["torch", *cpu_kernel_backends()]:
        got_inputs, got_targets = ops.mix_patchify(imgs.double(), 4, backend=backend,
                                                   **dict(kwargs, lam=kwargs["lam"].double()))
        assert got_inputs.dtype == torch.float64
        assert_close(got_inputs.float(), want_inputs)
        for got, want in zip(got_targets, want_targets):
            assert got.dtype == torch.float64 and got.shape == want.shape
            assert_close(got.float(), want)
    one = dict(kwargs, lam=0.25)
    want_inputs, _ = ops.mix_patchify(imgs, 4, **one)
    for lam in (torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64), np.float32(0.25)):
        assert torch.equal(ops.mix_patchify(imgs, 4, **dict(kwargs, lam=lam))[0], want_inputs)


def test_meta_tensors_give_shapes():
    meta = torch.device("meta")
    inputs, (target, other) = ops.mix_patchify(
        torch.rand(2, 3, 8, 12, device=meta), 4, partner=torch.zeros(2, dtype=torch.long, device=meta),
        lam=0.5, ids_keep=torch.zeros(2, 2, dtype=torch.long, device=meta))
    assert inputs.shape == (2, 2, 48) and target.shape == other.shape == (2, 6, 48)
    assert inputs.device.type == "meta"


def test_index_dtypes_mixed():
    for backend in ["torch", *cpu_kernel_backends()]:
        imgs, kwargs = make_case("float32", mix=True)
        # ids_masked stays int64
        kwargs.update(partner=kwargs["partner"].int(), ids_keep=kwargs["ids_keep"].int())
        check_against_torch(backend, imgs, 4, **kwargs)


def test_defaults_and_shapes():
    imgs = torch.randint(0, 256, (2, 3, 8, 12), dtype=torch.uint8)
    inputs, targets = ops.mix_patchify(imgs, 4)
    assert inputs.dtype == torch.float32 and inputs.shape == (2, 6, 48) and len(targets) == 1
    inputs, targets = ops.mix_patchify(imgs.half(), 4, partner=torch.tensor([1, 0]), lam=0.25,
                                       ids_keep=torch.zeros(2, 1, dtype=torch.long), out_dtype=torch.bfloat16)
    assert inputs.shape == (2, 1, 48) and inputs.dtype == torch.bfloat16
    assert [t.shape for t in targets] == [(2, 6, 48)] * 2


# ----------------------------------------------------------------------------- validation
def _bad_cases():
    two = torch.tensor([0, 1])
    return [
        ("not divisible", dict(imgs=torch.rand(2, 3, 10, 8)), ValueError, "not divisible"),
        ("partner out of range", dict(partner=torch.tensor([0, 2]), lam=0.5), ValueError, "partner"),
        ("partner negative", dict(partner=torch.tensor([-1, 0]), lam=0.5), ValueError, "partner"),
        ("partner shape", dict(partner=torch.tensor([0, 1, 1]), lam=0.5), ValueError, "partner"),
        ("partner float", dict(partner=torch.tensor([0.0, 1.0]), lam=0.5), TypeError, "partner"),
        ("partner without lam", dict(partner=two), ValueError, "lam"),
        ("lam above 1", dict(partner=two, lam=1.5), ValueError, "lam"),
        ("lam tensor below 0", dict(partner=two, lam=torch.tensor([0.5, -0.1])), ValueError, "lam"),
        ("lam tensor nan", dict(partner=two, lam=torch.tensor([0.5, float("nan")])), ValueError, "lam"),
        ("lam int tensor", dict(partner=two, lam=torch.tensor([0, 1])), TypeError, "lam"),
        ("lam shape", dict(partner=two, lam=torch.rand(3)), ValueError, "lam"),
        ("lam bool", dict(partner=two, lam=True), TypeError, "lam"),
        ("imgs int32", dict(imgs=torch.zeros(2, 3, 8, 8, dtype=torch.int32)), TypeError, "imgs"),
        ("imgs 3-D", dict(imgs=torch.rand(3, 8, 8)), ValueError, "imgs"),
        ("ids float", dict(ids_keep=torch.zeros(2, 2)), TypeError, "ids_keep"),
        ("ids batch", dict(ids_keep=torch.zeros(3, 2, dtype=torch.long)), ValueError, "ids_keep"),
        ("ids out of range", dict(ids_masked=torch.full((2, 2), 4)), ValueError, "ids_masked"),
        ("mean without std", dict(mean=torch.zeros(3)), ValueError, "std"),
        ("mean shape", dict(mean=torch.zeros(2), std=torch.ones(2)), ValueError, "mean"),
        ("mean int", dict(mean=torch.zeros(3, dtype=torch.long), std=torch.ones(3)), TypeError, "mean"),
        ("out_dtype", dict(out_dtype=torch.int32), TypeError, "out_dtype"),
        ("out_dtype uint8", dict(out_dtype=torch.uint8), TypeError, "out_dtype"),
        ("norm_pix on one value", dict(imgs=torch.rand(2, 1, 4, 4), patch_size=1), ValueError, "norm_pix"),
        ("patch_size zero", dict(patch_size=0), ValueError, "patch_size"),
        ("backend", dict(backend="fast"), ValueError, "backend"),
        ("no channels", dict(imgs=torch.rand(2, 0, 8, 8), norm_pix=False), ValueError, "channel"),
        ("imgs bool", dict(imgs=torch.rand(2, 3, 8, 8) > 0.5), TypeError, "imgs"),
        ("patch_size float", dict(patch_size=4.0), TypeError, "patch_size"),
        ("lam 2-D", dict(partner=two, lam=torch.rand(2, 1)), ValueError, "lam"),
        ("lam bool tensor", dict(partner=two, lam=torch.tensor([True, False])), TypeError, "lam"),
        ("std zero", dict(mean=torch.zeros(3), std=torch.tensor([1.0, 0.0, 1.0])), ValueError, "std"),
        ("std negative", dict(mean=torch.zeros(3), std=torch.tensor([1.0, -0.5, 1.0])), ValueError, "std"),
        ("std nan", dict(mean=torch.zeros(3), std=torch.tensor([1.0, float("nan"), 1.0])), ValueError, "std"),
        ("mean inf", dict(mean=torch.tensor([0.0, float("inf"), 0.0]), std=torch.ones(3)), ValueError,
         "mean"),
        ("norm_pix str", dict(norm_pix="no"), TypeError, "norm_pix"),
        ("check_indices str", dict(check_indices="no"), TypeError, "check_indices"),
        # devices are compared before any value is read (reading a meta tensor used to raise
        # NotImplementedError from the range check)
        ("partner on meta", dict(partner=two.to("meta"), lam=0.5), ValueError, "device"),
        ("lam on meta", dict(partner=two, lam=torch.rand(2, device="meta")), ValueError, "device"),
        ("ids on meta", dict(ids_keep=torch.zeros(2, 1, dtype=torch.long, device="meta")), ValueError,
         "device"),
        ("imgs on meta", dict(imgs=torch.rand(2, 3, 8, 8, device="meta"), partner=two, lam=0.5), ValueError,
         "device"),
    ]


@pytest.mark.parametrize("kwargs,err,match", [pytest.param(*case[1:], id=case[0]) for case in _bad_cases()])
def test_rejects(kwargs, err, match):
    kwargs = dict(kwargs)
    imgs = kwargs.pop("imgs", torch.rand(2, 3, 8, 8))
    p = kwargs.pop("patch_size", 4)
    with pytest.raises(err, match=match):
        ops.mix_patchify(imgs, p, **kwargs)


def test_rejects_devices_apart():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device to put one argument on")
    with pytest.raises(ValueError, match="device"):
        ops.mix_patchify(torch.rand(2, 3, 8, 8), 4, partner=torch.tensor([1, 0], device="cuda"), lam=0.5)


# ----------------------------------------------------------------------------- registration and compile
@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
def test_opcheck(backend):
    imgs, kwargs = make_case("uint8+meanstd", b=2, height=8, width=8)
    args = (imgs, 4, kwargs["partner"], kwargs["lam"], kwargs["ids_keep"], kwargs["ids_masked"], True,
            kwargs["mean"], kwargs["std"], torch.bfloat16, backend)
    torch.library.opcheck(torch.ops.maskedssl.mix_patchify.default, args)
    no_mix = (imgs.float(), 4, None, None, None, None, False, None, None, torch.float32, backend)
    torch.library.opcheck(torch.ops.maskedssl.mix_patchify.default, no_mix)


def _embed_step(imgs, partner, lam, ids_keep, ids_masked, weight, bias, backend):
    inputs, targets = ops.mix_patchify(imgs, 4, partner=partner, lam=lam, ids_keep=ids_keep,
                                       ids_masked=ids_masked, out_dtype=weight.dtype, backend=backend)
    return ops.embed_patches(inputs, weight, bias), targets


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
def test_compiles_with_embed_patches(backend):
    imgs, kwargs = make_case("float32", b=2)
    weight = torch.randn(16, 3, 4, 4, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    args = (imgs, kwargs["partner"], kwargs["lam"], kwargs["ids_keep"], kwargs["ids_masked"], weight, bias,
            backend)
    compiled = torch.compile(_embed_step, fullgraph=True, backend="aot_eager")
    got_tokens, got_targets = compiled(*args)
    want_tokens, want_targets = _embed_step(*args)
    torch.testing.assert_close(got_tokens, want_tokens)
    for got, want in zip(got_targets, want_targets):
        torch.testing.assert_close(got, want)
    got_tokens.sum().backward()
    assert weight.grad is not None and bias.grad is not None


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
def test_compiled_value_checks_assert_on_device(backend):
    # under torch.compile the eager checks (one sync each) were skipped: a partner or row index out of
    # range reached the kernels, which read past the images (values like -6.9e25 and NaN came back)
    torch._dynamo.reset()
    imgs, kwargs = make_case("uint8+meanstd", b=2)

    def step(imgs, partner, lam, ids_keep, ids_masked, mean, std):
        return ops.mix_patchify(imgs, 4, partner=partner, lam=lam, ids_keep=ids_keep, ids_masked=ids_masked,
                                mean=mean, std=std, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    names = ("partner", "lam", "ids_keep", "ids_masked", "mean", "std")
    good = [kwargs[name] for name in names]
    got, want = compiled(imgs, *good), step(imgs, *good)
    assert torch.equal(got[0], want[0])
    length = 15
    for name, bad, message in (
            ("partner", [0, 2], r"partner must hold indices in \[0, 2\)"),
            ("partner", [-1, 0], r"partner must hold indices in \[0, 2\)"),
            ("lam", [0.5, 1.5], r"lam must hold weights in \[0, 1\]"),
            ("lam", [float("nan"), 0.5], r"lam must hold weights in \[0, 1\]"),
            ("ids_keep", None, rf"ids_keep must hold indices in \[0, {length}\)"),
            ("ids_masked", None, rf"ids_masked must hold indices in \[0, {length}\)"),
            ("mean", [0.5, float("inf"), 0.5], "mean must be finite"),
            ("std", [0.2, 0.0, 0.2], "std finite and positive")):
        args = [t.clone() for t in good]
        i = names.index(name)
        if bad is None:
            args[i][1, 0] = length
        else:
            args[i] = torch.tensor(bad, dtype=args[i].dtype)
        with pytest.raises(RuntimeError, match=message):
            compiled(imgs, *args)


@pytest.mark.parametrize("backend", ["torch", *cpu_kernel_backends()])
def test_compiled_float_lam_does_not_recompile_per_value(backend):
    # i-MAE draws a new float lam every step; the op filled it into a tensor with torch.full, which made
    # dynamo specialise on its value: a recompile per step, and fullgraph failed at the recompile limit
    torch._dynamo.reset()
    imgs, kwargs = make_case("uint8", b=2, mix=False)
    partner = torch.tensor([1, 0])

    def step(imgs, lam):
        return ops.mix_patchify(imgs, 4, partner=partner, lam=lam, backend=backend, **kwargs)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for lam in (0.0, 1.0, *torch.rand(10).tolist()):  # more values than dynamo's recompile limit (8)
        got_inputs, got_targets = compiled(imgs, lam)
        want_inputs, want_targets = step(imgs, lam)
        assert torch.equal(got_inputs, want_inputs)
        for got, want in zip(got_targets, want_targets):
            assert torch.equal(got, want)


# ----------------------------------------------------------------------------- GPU
GPU_BACKENDS = gpu_kernel_backends()


@pytest.mark.gpu
@pytest.mark.parametrize("backend,kind,mix,ids,norm_pix,out_dtype",
                         _matrix_params(GPU_BACKENDS or ["triton", "cuda"]))
def test_gpu_matches_torch(backend, kind, mix, ids, norm_pix, out_dtype):
    if backend not in GPU_BACKENDS:
        pytest.skip(f"{backend} backend unavailable on CUDA here")
    for index_dtype in (torch.int32, torch.int64):
        imgs, kwargs = make_case(kind, mix=mix, ids=ids, index_dtype=index_dtype, device="cuda")
        check_against_torch(backend, imgs, 4, norm_pix=norm_pix, out_dtype=out_dtype, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["triton", "cuda"])
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("p,c,height,width,b", [
    (2, 3, 32, 32, 5), (4, 3, 32, 32, 64), (4, 1, 12, 20, 7), (8, 3, 64, 64, 9), (14, 3, 224, 224, 3),
    (16, 3, 224, 224, 16), (16, 1, 48, 80, 4), (32, 3, 64, 96, 2), (28, 1, 56, 28, 3)])
def test_gpu_shapes(backend, kind, p, c, height, width, b):
    if backend not in GPU_BACKENDS:
        pytest.skip(f"{backend} backend unavailable on CUDA here")
    imgs, kwargs = make_case(kind, b=b, c=c, height=height, width=width, p=p, device="cuda", mask_ratio=0.75)
    check_against_torch(backend, imgs, p, out_dtype=torch.bfloat16, **kwargs)
    check_against_torch(backend, imgs, p, out_dtype=torch.float32, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["triton", "cuda"])
def test_gpu_special_cases(backend):
    if backend not in GPU_BACKENDS:
        pytest.skip(f"{backend} backend unavailable on CUDA here")
    # non-contiguous images
    base = torch.randint(0, 256, (4, 40, 40, 3), dtype=torch.uint8, device="cuda")
    for imgs in (base[:, 4:36, 4:36].permute(0, 3, 1, 2),
                 torch.rand(4, 3, 48, 32, device="cuda").transpose(2, 3),
                 torch.rand(5, 4, 40, 40, device="cuda")[:4, 1:, 4:36, 4:36]):
        _, kwargs = make_case("float32", b=4, height=32, width=32, device="cuda")
        check_against_torch(backend, imgs, 4, mean=torch.tensor(MEAN, device="cuda"),
                            std=torch.tensor(STD, device="cuda"), **kwargs)
    # batch 1 with itself as partner, exact ends, uint8 == normalise first
    imgs, kwargs = make_case("float32", b=1, device="cuda")
    kwargs["partner"] = torch.zeros(1, dtype=torch.long, device="cuda")
    inputs, (target, other) = check_against_torch(backend, imgs, 4, **kwargs)
    assert torch.equal(target, other)
    imgs, kwargs = make_case("float32", b=2, ids=False, device="cuda")
    rows = ops.patchify(imgs, 4)
    for lam, want in ((1.0, rows), (0.0, rows.flip(0))):
        inputs, _ = ops.mix_patchify(imgs, 4, partner=torch.tensor([1, 0], device="cuda"), lam=lam,
                                     backend=backend)
        assert torch.equal(inputs, want)
    imgs, kwargs = make_case("uint8+meanstd", b=8, height=32, width=32, device="cuda")
    mean, std = kwargs.pop("mean"), kwargs.pop("std")
    floats = (imgs.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    got_inputs, got_targets = ops.mix_patchify(imgs, 4, mean=mean, std=std, backend=backend, **kwargs)
    want_inputs, want_targets = ops.mix_patchify(floats, 4, backend=backend, **kwargs)
    assert_close(got_inputs, want_inputs)
    for got, want in zip(got_targets, want_targets):
        assert_close(got, want)
    # the headline shape at twice the batch
    imgs, kwargs = make_case("uint8", b=512, height=224, width=224, p=16, device="cuda", mask_ratio=0.75)
    check_against_torch(backend, imgs, 16, out_dtype=torch.bfloat16, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["triton", "cuda"])
def test_gpu_opcheck_and_compile(backend):
    if backend not in GPU_BACKENDS:
        pytest.skip(f"{backend} backend unavailable on CUDA here")
    imgs, kwargs = make_case("uint8+meanstd", b=2, height=8, width=8, device="cuda")
    args = (imgs, 4, kwargs["partner"], kwargs["lam"], kwargs["ids_keep"], kwargs["ids_masked"], True,
            kwargs["mean"], kwargs["std"], torch.bfloat16, backend)
    torch.library.opcheck(torch.ops.maskedssl.mix_patchify.default, args)
    if backend == "cuda":
        torch.library.opcheck(torch.ops.maskedssl.mix_patchify_cuda.default, args[:-1])
    imgs, kwargs = make_case("float32", b=2, device="cuda")
    weight = torch.randn(16, 3, 4, 4, device="cuda")
    args = (imgs, kwargs["partner"], kwargs["lam"], kwargs["ids_keep"], kwargs["ids_masked"], weight, None,
            backend)
    got, _ = torch.compile(_embed_step, fullgraph=True)(*args)
    torch.testing.assert_close(got, _embed_step(*args)[0])
