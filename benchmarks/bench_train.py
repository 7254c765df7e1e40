"""Images/s of whole training steps (forward, backward, AdamW step) for MAE, i-MAE and Self-guided MAE,
ours against the reference models of ``benchmarks/reference.py``, each in eager and under ``torch.compile``,
and for MAE the reference made faster in place by ``maskedssl.accelerate`` ("reference-accelerated").

    python -m benchmarks.bench_train [--preset vit_base --preset cifar_small] [--batch 256] [--quick]

Every impl gets the same inputs (float32 normalised images on the GPU, a fixed partner permutation for
i-MAE), bf16 autocast, fused AdamW over the trainable parameters, and is timed per step with CUDA events
(median of ``--steps`` after ``--warmup`` steps; compile time reported apart). Self-guided MAE is timed in
its informed phase (``progress=1``); it is also timed in its random-mask warm-up phase, and the difference
is the informed-mask step (features + bi-partition + mask), reported as a share of the informed step.

MFU: model FLOPs / step time / the bf16 matmul rate measured in the same run. Model FLOPs are counted per
layer (``step_flops``): every Linear/patch-embedding GEMM at 2 FLOPs per multiply-add on the tokens it must
see (the encoder sees the K kept patches, the decoder all L), plus attention's two batched GEMMs
(4 * T^2 * D per block); a trained part costs 3x its forward (forward, input grads, weight grads), a
frozen or no-grad part (i-MAE teacher, Self-guided MAE feature pass) 1x. LayerNorm, softmax, GELU, the
loss and the optimizer are not counted. The count is the same for every impl of a method, so MFU ratios
are speed ratios; the reference's extra work (patch-embedding all L patches) earns it nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch

from benchmarks.common import add_speedups, format_table, make_row, measure_peaks, require_cuda, write_results
from benchmarks.reference import ReferenceConfig, build_reference, config_from_model

METHODS = ("mae", "imae", "sgmae")
PRESETS = ("vit_base", "cifar_small")  # ViT-B/16 at 224 px, and ViT-S/4 at CIFAR's 32 px
IMPLS = ("ours", "ours-compile", "reference", "reference-compile", "reference-accelerated")
# maskedssl.accelerate() takes a facebookresearch/mae-style MAE: the MAE reference only.
ACCELERATED_METHODS = ("mae",)


# ----------------------------------------------------------------------------- FLOP count
def block_flops(tokens: int, dim: int, mlp_ratio: float) -> int:
    """Forward FLOPs of one transformer block on one sequence: qkv, proj, two MLP GEMMs, QK^T and AV."""
    linear = 2 * tokens * dim * dim * (4 + 2 * mlp_ratio)
    return int(linear + 4 * tokens * tokens * dim)


def encoder_flops(cfg: ReferenceConfig, patches: int, depth: int | None = None) -> int:
    """Patch embedding of ``patches`` patches and ``depth`` blocks on them plus the cls token."""
    row = cfg.patch_size ** 2 * cfg.in_chans
    depth = cfg.depth if depth is None else depth
    return 2 * patches * row * cfg.embed_dim + depth * block_flops(patches + 1, cfg.embed_dim, cfg.mlp_ratio)


def decoder_flops(cfg: ReferenceConfig, length: int) -> int:
    """The decoder after its input projection: blocks on L + 1 tokens, prediction head on the L patches."""
    row = cfg.patch_size ** 2 * cfg.in_chans
    d = cfg.decoder_embed_dim
    return cfg.decoder_depth * block_flops(length + 1, d, cfg.mlp_ratio) + 2 * length * d * row


def step_flops(method: str, cfg: ReferenceConfig, batch: int, teacher: bool = True) -> int:
    """Model FLOPs of one training step of ``method`` on ``batch`` images (see the module docstring)."""
    length = (cfg.img_size // cfg.patch_size) ** 2
    kept = int(length * (1 - cfg.mask_ratio))
    embed = 2 * (kept + 1) * cfg.embed_dim * cfg.decoder_embed_dim  # decoder_embed, or one i-MAE head
    mae = encoder_flops(cfg, kept) + embed + decoder_flops(cfg, length)
    if method == "mae":
        per_image = 3 * mae
    elif method == "imae":
        trained = encoder_flops(cfg, kept) + 2 * embed + 2 * decoder_flops(cfg, length)
        frozen = 2 * (encoder_flops(cfg, kept) + embed) if teacher else 0
        per_image = 3 * trained + frozen
    elif method == "sgmae":
        layers = cfg.sg_layer % (cfg.depth + 1)  # hidden state 0 is the embeddings
        similarity = 2 * length * length * cfg.embed_dim
        per_image = 3 * mae + encoder_flops(cfg, length, depth=layers) + similarity
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return batch * per_image


# ----------------------------------------------------------------------------- steps
@dataclasses.dataclass
class TrainStep:
    """One impl's training step, ready to call: ``step()`` runs forward, backward and the optimizer."""

    method: str
    impl: str
    model: torch.nn.Module
    step: Callable[[], None]
    set_progress: Callable[[float], None]
    config: ReferenceConfig


def build_ours(method: str, preset: str, **options) -> torch.nn.Module:
    from maskedssl.models import build_model

    if method == "imae" and "teacher" not in options:
        options["teacher"] = build_model("mae", preset).requires_grad_(False).eval()
    return build_model(method, preset, **options)


def make_step(method: str, preset: str, impl: str, batch: int, device: str = "cuda",
              autocast_dtype: torch.dtype | None = torch.bfloat16, seed: int = 0) -> TrainStep:
    """Build ``impl`` of ``method`` at ``preset`` with its optimizer and inputs; return its step."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    torch.manual_seed(seed)
    ours = build_ours(method, preset)
    cfg = config_from_model(ours)
    if impl.startswith("ours"):
        model = ours
    else:
        del ours
        model = build_reference(method, cfg)
    if impl == "reference-accelerated":
        if method not in ACCELERATED_METHODS:
            raise ValueError(f"{impl} applies to {ACCELERATED_METHODS} only, not {method!r}")
        from maskedssl import accelerate

        model = accelerate(model)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=torch.device(device).type == "cuda")
    forward = torch.compile(model) if impl.endswith("compile") else model
    gen = torch.Generator(device=device).manual_seed(seed)
    imgs = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device, generator=gen)
    kwargs = {"partner": torch.randperm(batch, device=device, generator=gen)} if method == "imae" else {}
    state = {"progress": 1.0}
    use_autocast = autocast_dtype is not None

    def step() -> None:
        extra = {"progress": state["progress"]} if method == "sgmae" else {}
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=use_autocast):
            out = forward(imgs, **kwargs, **extra)
        loss = loss_of(out)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def set_progress(progress: float) -> None:
        state["progress"] = progress

    return TrainStep(method, impl, model, step, set_progress, cfg)


def loss_of(out) -> torch.Tensor:
    """The loss from ours (ModelOutput), the MAE reference (the official (loss, pred, mask)) or the others."""
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, tuple) else out.loss


def time_steps(step: Callable[[], None], warmup: int, iters: int) -> tuple[float, float]:
    """(median ms per step over ``iters`` CUDA-event-timed steps, peak GiB allocated while timing)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    events = [tuple(torch.cuda.Event(enable_timing=True) for _ in range(2)) for _ in range(iters)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    ms = statistics.median(start.elapsed_time(end) for start, end in events)
    return ms, torch.cuda.max_memory_allocated() / 2**30


def measure(method: str, preset: str, impl: str, batch: int, peaks: dict, warmup: int, iters: int) -> dict:
    train = make_step(method, preset, impl, batch)
    start = time.perf_counter()
    train.step()  # the first step compiles under torch.compile
    torch.cuda.synchronize()
    first_step_s = time.perf_counter() - start
    ms, peak_gib = time_steps(train.step, warmup, iters)
    flops = step_flops(method, train.config, batch)
    case = {"method": method, "preset": preset, "batch": batch}
    row = make_row("train_step", case, impl, ms, 0, flops, peaks)
    row["extra"] = {"images_per_s": batch / (ms * 1e-3), "mfu_pct": row["pct_of_floor"],
                    "peak_mem_gib": peak_gib, "first_step_s": first_step_s}
    if method == "sgmae":
        train.set_progress(0.0)  # warm-up phase: random masks, no feature pass or bi-partition
        train.step()
        random_ms, _ = time_steps(train.step, warmup, iters)
        row["extra"]["random_mask_ms"] = random_ms
        row["extra"]["informed_mask_pct"] = max(0.0, ms - random_ms) / ms * 100
    return row


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append",
                        help=f"model preset (repeatable; default {', '.join(PRESETS)})")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--method", action="append", choices=METHODS, help="repeatable; default all")
    parser.add_argument("--impl", action="append", choices=IMPLS, help="repeatable; default all")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--quick", action="store_true", help="vit_base only, 3 warm-up + 8 timed steps")
    parser.add_argument("--no-index-checks", action="store_true",
                        help="MASKEDSSL_CHECK_INDICES=0: skip the ops' eager index range checks (one "
                             "device->host sync each); on by default, as in the library")
    args = parser.parse_args(argv)
    if args.no_index_checks:
        os.environ["MASKEDSSL_CHECK_INDICES"] = "0"
    require_cuda("benchmarks.bench_train")
    presets = args.preset or list(PRESETS[:1] if args.quick else PRESETS)
    warmup, iters = (3, 8) if args.quick else (args.warmup, args.steps)
    peaks = measure_peaks()
    print(f"copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s")
    # eager runs of every method before any compiled one: a time-boxed session keeps the cheap numbers
    runs = [(preset, method, impl) for preset in presets for method in args.method or METHODS
            for impl in args.impl or IMPLS
            if impl != "reference-accelerated" or method in ACCELERATED_METHODS]
    runs.sort(key=lambda r: (presets.index(r[0]), r[2].endswith("-compile")))
    rows, failed, interrupted = [], {}, False
    try:
        for preset, method, impl in runs:
            name = f"{preset} {method} {impl}"
            try:
                row = measure(method, preset, impl, args.batch, peaks, warmup, iters)
            except torch.cuda.OutOfMemoryError:
                failed[name] = f"out of memory at batch {args.batch}"
                print(f"{name}: {failed[name]}; skipped")
            except Exception:  # noqa: BLE001  (one failing impl should not cost the others' numbers)
                failed[name] = traceback.format_exc(limit=3)
                print(f"{name} FAILED:\n{failed[name]}")
            else:
                rows.append(row)
                print(f"{name}: {row['ms']:.1f} ms, {row['extra']['images_per_s']:.0f} img/s, "
                      f"MFU {row['pct_of_floor']:.1f}%")
            release()
    except KeyboardInterrupt:  # a time limit (SIGINT): keep what was measured
        interrupted = True
        print(f"interrupted after {len(rows)} of {len(runs)} runs; writing those")
    add_speedups(rows, baselines=("reference", "reference-compile"))
    print(format_table(rows, peaks))
    extra = {"warmup": warmup, "steps": iters, "autocast": "bfloat16", "optimizer": "AdamW(fused)",
             "index_checks": os.environ.get("MASKEDSSL_CHECK_INDICES", "1") != "0", "failed": failed,
             "interrupted": interrupted}
    path = write_results("train", rows, peaks, extra=extra)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    if failed:
        sys.exit(f"runs that failed: {', '.join(failed)}")

if __name__ == "__main__":
    main()
