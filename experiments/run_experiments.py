"""Train MAE, i-MAE and Self-guided MAE on the same budget and compare them with maskedssl.evaluate.

    .venv/bin/python experiments/run_experiments.py --epochs 8   # embedded synthetic data, CPU scale (9 min)
    .venv/bin/python experiments/run_experiments.py --data cifar10:PATH --out experiments/results/cifar10

Every method gets the same preset, data, epochs, batch size and learning-rate schedule, through the
trainer's own API (``maskedssl.train.train``). Training runs one epoch per call (``max_steps`` + resume,
which continues bit-exactly), so that after every epoch the script can record, on a fixed set of test
images: token relations of each encoder layer (for their KL to the final model's), the bi-partition gap
and the decoder's exploitation rates. At the end each model (and an untrained encoder, for reference) is
evaluated: linear probe and k-NN (cls and mean-pooled), a short fine-tune, i-MAE separability per mixing
weight, and the Self-guided MAE clustering metrics (with the object-mask IoU on the synthetic data).

Writes OUT/results.json, OUT/results.md (the table, the scale and the command) and OUT/*.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from maskedssl import evaluate as ev
from maskedssl import models
from maskedssl.data import EpochSampler, build_dataset
from maskedssl.ops import ncut_bipartition
from maskedssl.train import DataConfig, MethodConfig, OptimConfig, RunConfig, TrainConfig, load_model, train

METHOD_NAMES = {"random": "untrained encoder", "mae": "MAE", "imae": "i-MAE", "sgmae": "Self-guided MAE"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic:1500",
                   help="synthetic[:N] | cifar10:PATH (default: synthetic:1500)")
    p.add_argument("--preset", default="micro", help="architecture preset (default: micro)")
    p.add_argument("--methods", default="mae,imae,sgmae")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3, help="absolute peak learning rate (default: 1.5e-3; "
                   "MAE's blr 1.5e-4 * batch/256 is far too small for a run this short)")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--max-train", type=int, default=None, help="evaluation: at most this many train images")
    p.add_argument("--max-test", type=int, default=None, help="evaluation: at most this many test images")
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--finetune-epochs", type=int, default=0, help="end-to-end fine-tune epochs per model "
                   "(default 0: skipped, about 2 min per model and epoch on this CPU)")
    p.add_argument("--sep-images", type=int, default=500)
    p.add_argument("--cluster-images", type=int, default=64)
    p.add_argument("--track-images", type=int, default=32, help="test images tracked after every epoch")
    p.add_argument("--imae-teacher", action="store_true", help="distil i-MAE from this run's MAE (i-MAE then "
                   "builds on MAE's budget: off by default, so the budgets stay equal)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared CPU, "
                   "more threads than free cores slow every op down)")
    p.add_argument("--out", default="experiments/results/synthetic", help="tables and plots (committed)")
    p.add_argument("--runs", default="runs/experiments", help="checkpoints and training logs (git-ignored)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_config(args, method: str, out: Path, teacher: str | None) -> TrainConfig:
    return TrainConfig(
        DataConfig(data=args.data),
        MethodConfig(method=method, model=args.preset, teacher=teacher),
        OptimConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    warmup_epochs=args.warmup_epochs),
        RunConfig(out=str(out), seed=args.seed, device="cpu" if not torch.cuda.is_available() else "auto",
                  progress=False, tensorboard=False, resume="auto"),
    )


@torch.no_grad()
def track(model: torch.nn.Module, images: torch.Tensor, seed: int) -> dict:
    """What is followed over training: per-layer token relations, the last layer's bi-partition gap,
    the decoder's exploitation rates (mask-token queries) at the current masking."""
    enc = ev.encoder_maps(model, images)
    feats = enc["feats"][-1]
    gap = ev.intra_inter_gap(ev.cosine_similarity_matrix(feats), ncut_bipartition(feats).foreground)["gap"]
    dec = ev.decoder_maps(model, images, progress=1.0, seed=seed)
    rates = [ev.exploitation_rates(a, dec["row_mask"], dec["num_prefix"]) for a in dec["attention"]]
    return dict(relations=[ev.token_relations(f) for f in enc["feats"]], gap=gap.nanmean().item(),
                exploitation_visible=[r["visible"] for r in rates],
                exploitation_mask=[r["mask"] for r in rates])


def pretrain(args, method: str, tracked: torch.Tensor, teacher: str | None) -> tuple[dict, list]:
    """Train ``method`` epoch by epoch; returns (timing, per-epoch tracking records)."""
    out = Path(args.runs) / method
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_config(args, method, out, teacher)
    train_len = len(build_dataset(args.data, train=True, img_size=models.PRESETS[args.preset].img_size,
                                  seed=args.seed))
    steps_per_epoch = EpochSampler(train_len, args.batch_size).num_batches
    history, loop_seconds = [], 0.0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        cfg.run.max_steps = epoch * steps_per_epoch
        summary = train(cfg)
        loop_seconds += summary["seconds"]
        model = load_model(out / "checkpoint.pt")
        history.append(dict(epoch=epoch, **track(model, tracked, args.seed)))
    wall = time.perf_counter() - start
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final_loss = [r["loss"] for r in losses if r.get("kind") == "train"][-1]
    return dict(train_seconds=loop_seconds, wall_seconds=wall, steps=args.epochs * steps_per_epoch,
                final_loss=final_loss), history


def kl_to_final(history: list) -> list[list[float]]:
    """KL(relations at epoch e || relations at the last epoch) per epoch, per layer."""
    final = history[-1]["relations"]
    return [[ev.relation_kl(r, f).mean().item() for r, f in zip(h["relations"], final)] for h in history]


def args_weights(results: dict) -> list[float]:
    return next(iter(results.values()))["eval"]["separability"]["weights"]


def fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def plot_tracking(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [m for m in results if "tracking" in results[m]]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for j, method in enumerate(trained[:3]):
        kl = results[method]["tracking"]["kl_to_final"]
        epochs = results[method]["tracking"]["epochs"]
        for layer in range(len(kl[0])):
            axes[0, j].plot(epochs, [row[layer] for row in kl], marker="o", label=f"layer {layer}")
        axes[0, j].set(title=f"{METHOD_NAMES[method]}: KL(relations_e || final)", xlabel="epoch")
        axes[0, j].legend(fontsize=7)
    for method in trained:
        t = results[method]["tracking"]
        name = METHOD_NAMES[method]
        axes[1, 0].plot(t["epochs"], t["gap"], marker="o", label=name)
        axes[1, 1].plot(t["epochs"], [v[-1] for v in t["exploitation_visible"]], marker="o",
                        label=f"{name} visible")
        axes[1, 1].plot(t["epochs"], [v[-1] for v in t["exploitation_mask"]], marker="s", ls="--",
                        label=f"{name} mask")
    for method in trained + (["random"] if "random" in results else []):
        c = results[method]["eval"]["clustering"]
        dist = c["attention_distance"] + c["decoder_attention_distance"]
        style = dict(marker="x", ls=":") if method == "random" else dict(marker="o")
        axes[1, 2].plot(range(len(dist)), dist, label=METHOD_NAMES[method], **style)
    axes[1, 0].set(title="mu_intra - mu_inter (last encoder layer)", xlabel="epoch")
    axes[1, 1].set(title="exploitation rates, last decoder layer", xlabel="epoch")
    axes[1, 2].set(title="mean attention distance (px)", xlabel="layer (encoder, then decoder)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def claim_checks(results: dict) -> list[str]:
    """The papers' directional claims, each checked against this run's numbers (yes / no, with values)."""
    notes = []

    def line(claim: str, holds: bool, detail: str) -> None:
        notes.append(f"- {claim}: **{'yes' if holds else 'no'}** here ({detail}).")

    mae, imae, sg = results.get("mae"), results.get("imae"), results.get("sgmae")
    if mae and imae:
        a, b = mae["eval"]["separability"], imae["eval"]["separability"]
        wins = sum(y > x for x, y in zip(a["r2"], b["r2"]))
        line("i-MAE's features of a mixture are more linearly separable than MAE's (higher R^2)",
             wins > len(a["r2"]) / 2, f"higher at {wins} of {len(a['r2'])} mixing weights; mean R^2 "
             f"{sum(b['r2']) / len(b['r2']):.3f} vs {sum(a['r2']) / len(a['r2']):.3f}")
        for pool in ("cls", "mean"):
            x, y = mae["eval"][f"probe_{pool}"], imae["eval"][f"probe_{pool}"]
            line(f"i-MAE probes better than MAE ({pool} features)", y > x, f"{y:.3f} vs {x:.3f}")
    if mae and sg:
        for pool in ("cls", "mean"):
            x, y = mae["eval"][f"probe_{pool}"], sg["eval"][f"probe_{pool}"]
            line(f"Self-guided MAE probes better than MAE ({pool} features)", y > x, f"{y:.3f} vs {x:.3f}")
        cs, cm = sg["eval"]["clustering"], mae["eval"]["clustering"]
        if "mask_object_coverage" in cs:
            line("informed masks concentrate on the object (share of object patches masked above a random "
                 "mask's)", cs["mask_object_coverage"] > cm["mask_object_coverage"],
                 f"{cs['mask_object_coverage']:.3f} vs {cm['mask_object_coverage']:.3f} for MAE's random "
                 "masks")
    if mae:
        t = mae["tracking"]
        line("MAE widens mu_intra - mu_inter during training", t["gap"][-1] > t["gap"][0],
             "per epoch " + ", ".join(f"{g:.3f}" for g in t["gap"]))
        kl = [sum(row) / len(row) for row in t["kl_to_final"]]
        line("MAE's token relations converge early (KL to the final model falls fastest in the first epochs)",
             len(kl) > 2 and kl[0] - kl[1] >= kl[1] - kl[2] >= 0,
             "per epoch " + ", ".join(f"{k:.4f}" for k in kl))
        c = mae["eval"]["clustering"]
        line("in MAE's last decoder layer mask tokens draw more on mask tokens than on visible ones",
             c["exploitation_mask"][-1] > c["exploitation_visible"][-1],
             f"{c['exploitation_mask'][-1]:.2f} vs {c['exploitation_visible'][-1]:.2f}")
        if "random" in results:
            s0 = results["random"]["eval"]["clustering"]
            line("MAE's patch features are more clustered than an untrained encoder's (sigma_s)",
                 c["sigma_s"] > s0["sigma_s"], f"{c['sigma_s']:.4f} vs {s0['sigma_s']:.4f}")
    return notes


def write_markdown(args, results: dict, meta: dict, path: Path) -> None:
    has_objects = any("fg_iou" in r["eval"].get("clustering", {}) for r in results.values())
    lines = [
        f"# MAE vs i-MAE vs Self-guided MAE: {args.data}, {args.preset}, {args.epochs} epochs (CPU scale)",
        "",
        f"**Scale.** {meta['scale']}",
        "",
        f"**Regenerate:** `{meta['command']}` ({meta['total_minutes']:.1f} min here on {meta['machine']}).",
        "",
        "Accuracies are fractions of the test set; definitions in docs/METRICS.md. The untrained encoder row "
        "is the same architecture at initialisation (no pretraining).",
        "",
        "| method | final loss | train s | probe cls | probe mean | k-NN cls | k-NN mean | fine-tune | "
        "sep R2 a=0.1 | sep R2 a=0.5 | sigma_F | sigma_s | gap cos | gap attn |"
        + (" fg IoU | mask IoU | obj. masked |" if has_objects else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if has_objects else ""),
    ]
    for method, r in results.items():
        e, c = r["eval"], r["eval"]["clustering"]
        sep = e["separability"]
        row = [METHOD_NAMES[method], fmt(r.get("train", {}).get("final_loss")),
               fmt(r.get("train", {}).get("train_seconds"), 0), fmt(e["probe_cls"]), fmt(e["probe_mean"]),
               fmt(e["knn_cls"]), fmt(e["knn_mean"]), fmt(e.get("finetune", "not run")),
               fmt(sep["r2"][sep["weights"].index(0.1)]), fmt(sep["r2"][sep["weights"].index(0.5)]),
               fmt(c["sigma_f"]), fmt(c["sigma_s"], 4), fmt(c["gap_cosine"]), fmt(c["gap_attention"], 4)]
        if has_objects:
            row += [fmt(c.get("fg_iou")), fmt(c.get("mask_iou")), fmt(c.get("mask_object_coverage"))]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Separability per mixing weight (held-out R^2 of f(mix) -> [f(sub), f(dom)]; "
              "probe accuracy of the subordinate / dominant label from f(mix))", "",
              "| method | " + " | ".join(f"a={w}" for w in args_weights(results)) + " |",
              "|---|" + "---|" * len(args_weights(results))]
    for method, r in results.items():
        sep = r["eval"]["separability"]
        cells = [f"{fmt(a)} ({fmt(s, 2)} / {fmt(d, 2)})"
                 for a, s, d in zip(sep["r2"], sep["probe_sub"], sep["probe_dom"])]
        lines.append(f"| {METHOD_NAMES[method]} | " + " | ".join(cells) + " |")
    lines += ["", "## Decoder exploitation rates after training (mask-token queries; per decoder layer: "
              "visible / mask)", ""]
    for method, r in results.items():
        c = r["eval"]["clustering"]
        pairs = ", ".join(f"{fmt(v, 2)} / {fmt(m, 2)}"
                          for v, m in zip(c["exploitation_visible"], c["exploitation_mask"]))
        informed = " (informed masks)" if c.get("informed") else ""
        lines.append(f"- {METHOD_NAMES[method]}: {pairs}{informed}")
    lines += ["", "## KL of token relations to the final model, per epoch (mean over encoder layers)", ""]
    for method, r in results.items():
        if "tracking" in r:
            kl = r["tracking"]["kl_to_final"]
            lines.append(f"- {METHOD_NAMES[method]}: " + ", ".join(fmt(sum(row) / len(row), 4) for row in kl))
    lines += ["", "Plots: `separability.png` (R^2 and label probes against the mixing weight), "
              "`tracking.png` (KL to final per layer, gap and exploitation rates per epoch, attention "
              "distance per layer).", "",
              "## The papers' directional claims at this scale (computed from the numbers above)", "",
              *meta["notes"], ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    img_size = models.PRESETS[args.preset].img_size
    train_set = build_dataset(args.data, train=True, img_size=img_size, seed=args.seed)
    test_set = build_dataset(args.data, train=False, img_size=img_size, seed=args.seed)
    tracked, _ = ev.load_images(test_set, args.track_images)
    eval_kwargs = dict(metrics=ev.METRICS, pools=("cls", "mean"), max_train=args.max_train,
                       max_test=args.max_test,
                       probe_epochs=args.probe_epochs, finetune_epochs=args.finetune_epochs,
                       sep_images=args.sep_images, cluster_images=args.cluster_images, seed=args.seed)

    results: dict = {}
    torch.manual_seed(args.seed)
    untrained = models.build_model("mae", args.preset)
    results["random"] = dict(eval=ev.evaluate_model(untrained, train_set, test_set, **eval_kwargs))
    print(f"[{time.perf_counter() - t0:.0f}s] untrained encoder evaluated", file=sys.stderr)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:
        teacher = None
        if method == "imae" and args.imae_teacher:
            teacher = str(Path(args.runs) / "mae" / "checkpoint.pt")
        timing, history = pretrain(args, method, tracked, teacher)
        model = load_model(Path(args.runs) / method / "checkpoint.pt")
        results[method] = dict(
            train=timing,
            eval=ev.evaluate_model(model, train_set, test_set, **eval_kwargs),
            tracking=dict(epochs=[h["epoch"] for h in history], kl_to_final=kl_to_final(history),
                          gap=[h["gap"] for h in history],
                          exploitation_visible=[h["exploitation_visible"] for h in history],
                          exploitation_mask=[h["exploitation_mask"] for h in history]),
        )
        print(f"[{time.perf_counter() - t0:.0f}s] {method} trained and evaluated", file=sys.stderr)

    ev.plot_separability({METHOD_NAMES[m]: r["eval"]["separability"] for m, r in results.items()},
                         root / "separability.png")
    plot_tracking(results, root / "tracking.png")
    total = time.perf_counter() - t0
    command = "python experiments/run_experiments.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    arch = models.PRESETS[args.preset]
    meta = dict(
        command=command.strip(), total_minutes=total / 60, commit=commit,
        machine=f"{platform.machine()} CPU, {args.threads} torch thread(s), shared with other jobs",
        torch=torch.__version__,
        scale=(f"{len(train_set)} train / {len(test_set)} test images of {img_size} px ({args.data}); "
               f"preset `{args.preset}` (ViT {arch.embed_dim} wide, {arch.depth} blocks, patch "
               f"{arch.patch_size}; decoder {arch.decoder_embed_dim} x {arch.decoder_depth}); {args.epochs} "
               f"epochs x batch {args.batch_size}, AdamW lr {args.lr} (warm-up {args.warmup_epochs} epoch, "
               f"cosine), mask ratio 0.75, the models' default options (i-MAE: same-class partners, "
               f"{'MAE teacher' if args.imae_teacher else 'no teacher'}; Self-guided MAE: informed masks "
               f"after 10% of training). Thousands of times smaller than the "
               f"papers' runs (hundreds of epochs on CIFAR/ImageNet): directions at this scale are weak "
               f"evidence at best."),
        notes=claim_checks(results),
    )
    out = dict(meta=meta, args=vars(args), results=results)
    (root / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    write_markdown(args, results, meta, root / "results.md")
    print(f"wrote {root / 'results.md'} in {total / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
