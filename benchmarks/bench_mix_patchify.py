"""Benchmark ``mix_patchify``: mixup + patchify + kept-row gather + normalised targets of both unmixed images.

Cases: B = 256, mask 0.75, mixing on (a random partner per sample, per-sample lam), norm_pix on, bf16
outputs; 224 px / patch 16 (the headline) and 32 px / patch 4 (CIFAR); imgs either float32 (already
normalised, as a torchvision loader delivers them) or uint8 (normalised with mean/std inside the op).

Impls: ``reference`` is the sequence the official MAE / i-MAE code runs, each step its own pass
(normalise, mix, patchify, gather the kept rows with an index repeated to (B, K, p*p*C); for the targets
patchify each unmixed image, per-patch mean/var, normalise, gather the masked rows); ``compile`` is
``torch.compile`` of that function; ``triton`` and ``cuda`` are ``maskedssl.ops.mix_patchify``. The op's
index range checks (one device->host sync each) are switched off while timing, as a training loop that
builds its own indices would.

Bytes (the floor): imgs read once + partner/lam/index tensors + each output written once. The kernels read
each pixel once per output row it feeds, so with a partner every image is fetched twice (as itself and as
someone's partner); ``kernel_mb`` in each row counts that traffic, which meets the floor only when the
second fetch hits L2.
"""

from __future__ import annotations

import torch

from benchmarks.common import bench_main, index_checks, make_row, time_ms
from maskedssl import ops

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CASES = [
    dict(size=224, patch=16, dtype="float32"),
    dict(size=224, patch=16, dtype="uint8"),
    dict(size=32, patch=4, dtype="float32"),
    dict(size=32, patch=4, dtype="uint8"),
]
BATCH = 256
MASK_RATIO = 0.75
OUT_DTYPE = torch.bfloat16


def reference(imgs, partner, lam, ids_keep, ids_masked, mean, std, patch_size):
    """The official code's passes: (B, C, H, W) -> inputs (B, K, p*p*C), (target, partner target)."""
    x = imgs
    if imgs.dtype == torch.uint8:  # ToTensor + Normalize, done on the GPU
        x = (imgs.float() / 255 - mean[None, :, None, None]) / std[None, :, None, None]
    other = x[partner]
    w = lam[:, None, None, None]
    mixed = w * x + (1 - w) * other
    patches = ops.patchify(mixed, patch_size)
    d = patches.shape[-1]
    inputs = torch.gather(patches, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d)).to(OUT_DTYPE)
    targets = []
    for img in (x, other):
        t = ops.patchify(img, patch_size)
        mu = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)
        t = (t - mu) / (var + 1.0e-6) ** 0.5
        targets.append(torch.gather(t, 1, ids_masked.unsqueeze(-1).repeat(1, 1, d)).to(OUT_DTYPE))
    return inputs, targets


def make_inputs(case: dict, device="cuda"):
    b, size, c = BATCH, case["size"], 3
    if case["dtype"] == "uint8":
        imgs = torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, device=device)
    else:
        imgs = torch.randn(b, c, size, size, device=device)
    length = (size // case["patch"]) ** 2
    ids_keep, ids_restore, _ = ops.random_masking(b, length, MASK_RATIO, device=device)
    ids_masked = torch.argsort(ids_restore, dim=1)[:, ids_keep.shape[1]:]
    return dict(imgs=imgs, partner=torch.randperm(b, device=device), lam=torch.rand(b, device=device),
                ids_keep=ids_keep, ids_masked=ids_masked, mean=torch.tensor(MEAN, device=device),
                std=torch.tensor(STD, device=device))


def byte_counts(case: dict, t: dict) -> tuple[int, int]:
    """(floor, kernel traffic) in bytes for one call."""
    imgs = t["imgs"]
    b, kept, masked = imgs.shape[0], t["ids_keep"].shape[1], t["ids_masked"].shape[1]
    row = case["patch"] ** 2 * imgs.shape[1]
    out = OUT_DTYPE.itemsize
    small = sum(t[k].numel() * t[k].element_size() for k in ("partner", "lam", "ids_keep", "ids_masked"))
    writes = b * (kept + 2 * masked) * row * out
    floor = imgs.numel() * imgs.element_size() + small + writes
    kernel = 2 * b * (kept + masked) * row * imgs.element_size() + small + writes
    return floor, kernel


def run(peaks: dict, quick: bool = False) -> list[dict]:
    with index_checks(False):
        return _run(peaks, quick)


def _run(peaks: dict, quick: bool) -> list[dict]:
    backends = [b for b in ("triton", "cuda") if b in ops.available_backends("cuda")]
    rows = []
    for case in CASES[:2] if quick else CASES:
        t = make_inputs(case)
        uint8 = case["dtype"] == "uint8"
        mean, std = (t["mean"], t["std"]) if uint8 else (None, None)
        args = (t["imgs"], t["partner"], t["lam"], t["ids_keep"], t["ids_masked"], t["mean"], t["std"],
                case["patch"])
        # afresh per case and static: a second image size would otherwise recompile with symbolic sizes
        torch._dynamo.reset()
        compiled = torch.compile(reference, dynamic=False)
        impls = {"reference": lambda: reference(*args), "compile": lambda: compiled(*args)}
        for backend in backends:
            impls[backend] = (lambda backend=backend: ops.mix_patchify(
                t["imgs"], case["patch"], partner=t["partner"], lam=t["lam"], ids_keep=t["ids_keep"],
                ids_masked=t["ids_masked"], mean=mean, std=std, out_dtype=OUT_DTYPE, backend=backend))
        want_inputs, want_targets = reference(*args)
        floor_bytes, kernel_bytes = byte_counts(case, t)
        label = dict(batch=BATCH, size=case["size"], patch=case["patch"], imgs=case["dtype"],
                     mask=MASK_RATIO, out="bf16")
        for impl, fn in impls.items():
            got_inputs, got_targets = fn()  # also warms up / compiles
            torch.testing.assert_close(got_inputs.float(), want_inputs.float(), atol=5e-2, rtol=2e-2)
            for got, want in zip(got_targets, want_targets):
                torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=2e-2)
            ms = time_ms(fn, warmup=10 if quick else 25, rep=50 if quick else 200)
            row = make_row("mix_patchify", label, impl, ms, floor_bytes, 0, peaks)
            row["extra"] = {"kernel_mb": round(kernel_bytes / 1e6, 1)}
            rows.append(row)
        del t, args, compiled, impls, want_inputs, want_targets
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    bench_main("mix_patchify", run)
