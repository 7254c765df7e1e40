"""The ``maskedssl`` command: ``pretrain``, ``evaluate`` and ``demo``.

Every field of train.py's config dataclasses is a flag (``num_workers`` -> ``--num-workers``), and so is
every option of the models' config dataclasses (``MAEConfig``, ``IMAEConfig``, ``SGMAEConfig``) and of
the architecture (``ModelConfig``). Precedence: dataclass defaults < ``--config FILE`` (JSON or TOML) <
flags. Errors the user can fix (a bad path, a bad value) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import typing
from pathlib import Path

from . import train as train_lib
from .data import DatasetError
from .train import (ConfigError, DataConfig, MethodConfig, OptimConfig, RunConfig, TrainConfig,
                    TrainingDiverged)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: JSON config files only
    tomllib = None

SECTIONS = {"data": DataConfig, "method": MethodConfig, "optim": OptimConfig, "run": RunConfig}

# Help for the models' option fields (their dataclasses document them in prose).
MODEL_OPTION_HELP = {
    "mask_ratio": "fraction of patches masked",
    "norm_pix_loss": "regress per-patch normalised pixels (MAE's norm_pix_loss)",
    "rec_sub_weight": "i-MAE: weight of the subordinate image's reconstruction loss",
    "rec_dom_weight": "i-MAE: weight of the dominant image's reconstruction loss",
    "distill_sub_weight": "i-MAE: weight of the subordinate branch's distillation loss (needs --teacher)",
    "distill_dom_weight": "i-MAE: weight of the dominant branch's distillation loss (needs --teacher)",
    "lam_mode": "i-MAE: one mixing weight per batch (official) or per sample",
    "lam_alpha": "i-MAE: mixing weight ~ Beta(alpha, alpha)",
    "warmup_frac": "Self-guided MAE: fraction of training with random masks before informed ones",
    "sg_layer": "Self-guided MAE: encoder layer whose patch features are clustered (0: embeddings, -1: last)",
    "hint_ratio": "Self-guided MAE: fraction of the masked object patches left visible as hints",
    "tau": "Self-guided MAE: TokenCut's binary-graph threshold (default: clamped cosine affinity)",
    "eps": "Self-guided MAE: affinity floor of the normalized cut",
    "center_features": "Self-guided MAE: subtract each image's mean patch feature before the cut",
}
ARCH_HELP = {
    "mean": "per-channel mean that uint8 images are normalised with, comma-separated (none: ImageNet's for "
            "3 channels, 0.5 otherwise)",
    "std": "per-channel std that uint8 images are normalised with, comma-separated",
}


def _error(message: str, per_process: bool = False) -> None:
    """Under torchrun a configuration error is every process's: process 0 says it once. An error that can
    be one process's own (an image only it reads) is said by each process that meets it."""
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(f"maskedssl: error: {message}", file=sys.stderr)
    elif per_process:
        print(f"maskedssl: error (process {rank}): {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# Flags from dataclass fields

def _value_type(hint):
    """(parser type, is_bool) for a field's type hint: int, float, str, bool, tuple[float, ...] (one
    comma-separated flag value: ``--mean 0.5,0.5,0.5``) and their Optionals."""
    optional = type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if base is bool:
        return None, True
    item = typing.get_args(base)[0] if typing.get_origin(base) is tuple else None

    def parse(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
        if item is not None:
            return tuple(item(v) for v in text.split(","))
        return base(text)

    # argparse names the type in its error messages
    parse.__name__ = f"comma-separated {item.__name__}" if item is not None else base.__name__
    return parse, False


def _add_field(group, dest: str, name: str, hint, default, help_text: str, flags: dict, **extra) -> None:
    flag = "--" + name.replace("_", "-")
    if flag in flags:  # the same option in several method configs: one flag
        return
    parse, is_bool = _value_type(hint)
    help_text = f"{help_text} (default: {default})"
    if is_bool:
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text)
    else:
        metavar = None if "choices" in extra else name.upper()
        group.add_argument(flag, dest=dest, type=parse, metavar=metavar, help=help_text, **extra)
    flags[flag] = dest


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> dict:
    """Add every config flag to ``parser`` (defaults suppressed, so only given flags override); returns
    {field name: dest} for config-file keys given without a section."""
    from . import models

    parser.add_argument("--config", metavar="FILE", help="JSON or TOML config: sections [data] [method] "
                        "[optim] [run] [method.options] as in OUT/config.json, or flat keys; flags override")
    flags: dict[str, str] = {}
    choices = {"method": sorted(models.METHODS), "model": sorted(models.PRESETS),
               "pairing": ["labels", "kmeans"], "precision": ["auto", "bf16", "fp16", "fp32"],
               "backend": ["auto", "torch", "triton", "cuda"]}
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__doc__.strip()})")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "options":
                continue
            extra = {"choices": choices[f.name]} if f.name in choices else {}
            if f.name == "resume":
                extra = {"nargs": "?", "const": "auto"}
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            _add_field(group, f"{section}.{f.name}", f.name, hints[f.name], default, f.metadata["help"],
                       flags, **extra)

    for method, model_cls in models.METHODS.items():
        cls = model_cls.config_class
        group = parser.add_argument_group(f"{method} options ({cls.__name__})")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name != "arch":
                _add_field(group, f"options.{f.name}", f.name, hints[f.name], f.default,
                           MODEL_OPTION_HELP.get(f.name, f"{cls.__name__}.{f.name}"), flags)
    group = parser.add_argument_group("architecture overrides (ModelConfig fields; default: the preset's)")
    hints = typing.get_type_hints(models.ModelConfig)
    for f in dataclasses.fields(models.ModelConfig):
        _add_field(group, f"options.{f.name}", f.name, hints[f.name], "preset",
                   ARCH_HELP.get(f.name, f"architecture: {f.name}"), flags)
    return {flag[2:].replace("-", "_"): dest for flag, dest in flags.items()}


def read_config_file(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    toml = p.suffix.lower() == ".toml"
    if toml and tomllib is None:
        raise ConfigError(f"config file {p}: TOML needs Python 3.11 or later; use JSON")
    try:
        tree = tomllib.loads(p.read_text()) if toml else json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"config file {p} cannot be parsed: {err}") from None
    if not isinstance(tree, dict):  # JSON may hold a list or a number at the top
        raise ConfigError(f"config file {p} must hold a table of keys, got a {type(tree).__name__}")
    return tree


def _assign(tree: dict, dest: str, value) -> None:
    section, name = dest.split(".")
    if section == "options":
        tree["method"]["options"][name] = value
    else:
        tree[section][name] = value


def config_from_args(args: argparse.Namespace, dests: dict) -> TrainConfig:
    """Defaults, then the config file, then the flags given."""
    tree = TrainConfig().to_dict()
    if getattr(args, "config", None):
        for key, value in read_config_file(args.config).items():
            if key in SECTIONS and isinstance(value, dict):
                for name, v in value.items():
                    if key == "method" and name == "options" and isinstance(v, dict):
                        tree["method"]["options"].update(v)
                    elif name in tree[key]:
                        tree[key][name] = v
                    else:
                        raise ConfigError(f"config file {args.config}: unknown key {name!r} in [{key}]")
            elif key in dests:
                _assign(tree, dests[key], value)
            else:
                raise ConfigError(f"config file {args.config}: unknown key {key!r}")
    for dest, value in vars(args).items():
        if "." in dest:
            _assign(tree, dest, value)
    return TrainConfig.from_dict(tree)


# ----------------------------------------------------------------------------------------------------
# Subcommands

def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, args.config_keys)
    summary = train_lib.train(cfg)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args)
    return 0


DEMO_CLASSES = "shape x texture"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--method", default="sgmae", choices=["mae", "imae", "sgmae"],
                        help="method to pretrain (default: sgmae: its informed masks make the best pictures)")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of pretraining: the epoch count "
                        "is chosen from a measured step time to fit (default: 120)")
    parser.add_argument("--epochs", type=int, default=None, help="fixed epoch count (overrides --budget)")
    parser.add_argument("--max-epochs", type=int, default=40, help="at most this many epochs (default: 40)")
    parser.add_argument("--train-size", type=int, default=5000, help="synthetic training images, at most "
                        "(default: 5000; the test split has a fifth as many)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3; short "
                        "runs need more than MAE's blr scaling gives a batch of 64)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--seed", type=int, default=0)


def _step_seconds(cfg: TrainConfig, device) -> float:
    """Measured seconds of one optimizer step of ``cfg``'s model (the costlier post-warm-up step)."""
    import torch

    from .data import augment_batch, build_dataset, pixel_stats, sample_partners

    torch.manual_seed(cfg.run.seed)
    model = train_lib.build_model(cfg.method).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = build_dataset(f"synthetic:{cfg.optim.batch_size}", True, model.img_size, cfg.run.seed)
    gen = torch.Generator().manual_seed(0)
    mean, std = pixel_stats(model)
    x = augment_batch(data.images.to(device), model.img_size, gen, mean=mean, std=std)
    partner = sample_partners(data.labels, 1.0, gen).to(device) if cfg.method.method == "imae" else None
    times = []
    for _ in range(3):
        tic = time.perf_counter()
        model(x, partner=partner, progress=1.0).loss.backward()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - tic)
    return min(times[1:])


def run_demo(args: argparse.Namespace) -> dict:
    """Pretrain the micro preset on the embedded data, probe it against a random initialisation, and
    write OUT/report.md with the numbers and pictures."""
    import torch

    from . import evaluate
    from .data import build_dataset

    start = time.perf_counter()
    out = Path(args.out).expanduser()
    for name in ("epochs", "max_epochs", "train_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 < args.budget < math.inf:
        raise ConfigError(f"--budget must be a positive number of seconds, got {args.budget}")
    if args.train_size < args.batch_size:  # the epoch count below divides by the steps per epoch
        raise ConfigError(f"--train-size {args.train_size} holds no batch of --batch-size {args.batch_size}")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(auto if args.device == "auto" else args.device)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available here")
    if device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1):
        # On an oversubscribed CPU, OpenMP workers that spin-wait for each other make every op several
        # times slower (measured: 5-13 s instead of 0.8 s per step on a busy 2-core machine); one thread
        # has no one to wait for.
        torch.set_num_threads(1)
        print("demo: the CPU is busy: using one thread", file=sys.stderr)
    cfg = TrainConfig(
        data=DataConfig(data=f"synthetic:{args.train_size}"),
        method=MethodConfig(method=args.method, model="micro"),
        optim=OptimConfig(epochs=args.epochs or 1, batch_size=args.batch_size, lr=args.lr, warmup_epochs=1.0),
        run=RunConfig(out=str(out), seed=args.seed, device=str(device), log_every=5))
    train_lib.validate(cfg)  # before the timing steps below run the ops
    if args.epochs is None:
        step_s = _step_seconds(cfg, device)
        affordable = max(4, int(args.budget / step_s))  # optimizer steps that fit the budget
        # whole epochs that spend the budget: as few images less than --train-size as that takes
        cfg.optim.epochs = min(args.max_epochs, math.ceil(affordable / (args.train_size // args.batch_size)))
        steps_per_epoch = min(args.train_size // args.batch_size, affordable // cfg.optim.epochs)
        cfg.data.data = f"synthetic:{steps_per_epoch * args.batch_size}"
        print(f"demo: {step_s:.2f} s per step -> {cfg.optim.epochs} epochs of {steps_per_epoch} steps in the "
              f"{args.budget:.0f} s budget", file=sys.stderr)
    cfg.optim.warmup_epochs = min(1.0, cfg.optim.epochs / 4)
    summary = train_lib.train(cfg)
    train_seconds = summary["seconds"]

    print("demo: linear probe, k-NN and patch clustering, pretrained vs random init", file=sys.stderr)
    train_set = build_dataset(cfg.data.data, True, 32, args.seed)
    test_set = build_dataset(cfg.data.data, False, 32, args.seed)
    metrics = ("probe", "knn", "clustering")
    trained = train_lib.load_model(out / train_lib.CHECKPOINT_NAME, map_location=device)
    torch.manual_seed(args.seed)
    scratch = train_lib.build_model(cfg.method).to(device).eval()
    # mean-pooled features only, of at most 2000 train images: the probe's numbers barely move with more,
    # while feature extraction is most of the evaluation's time on a CPU
    results = {name: evaluate.evaluate_model(model, train_set, test_set, metrics, pools=("mean",),
                                             max_train=2000, probe_epochs=50, cluster_images=128,
                                             seed=args.seed)
               for name, model in (("pretrained", trained), ("random init", scratch))}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind") == "train"]
    total_seconds = time.perf_counter() - start
    (out / "report.md").write_text(_demo_report(cfg, results, losses, train_seconds, total_seconds,
                                                summary["pictures"], out))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"demo: wrote {out / 'report.md'} ({time.perf_counter() - start:.0f} s in all)", file=sys.stderr)
    return results


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _probe_verdict(results: dict) -> str:
    gain = results["pretrained"]["probe_mean"] - results["random init"]["probe_mean"]
    if gain > 0:
        return f"Pretraining raised the linear probe {100 * gain:.1f} points above the random initialisation."
    return ("After so short a run the probe does not beat the random initialisation yet: masked-image "
            "features take long to become linearly separable (MAE pretrains for hundreds of epochs). "
            "The demo shows the whole pipeline; train longer on a GPU for features that probe well.")


def _demo_report(cfg, results, losses, train_seconds, total_seconds, pictures, out: Path) -> str:
    names = list(results)

    def row(label, get, fmt="{:.1%}"):
        cells = []
        for name in names:
            try:
                cells.append(fmt.format(get(results[name])))
            except (KeyError, TypeError):
                cells.append("-")
        return f"| {label} | " + " | ".join(cells) + " |"

    import torch

    method_names = {"mae": "MAE", "imae": "i-MAE", "sgmae": "Self-guided MAE"}
    device_name = (torch.cuda.get_device_name() if cfg.run.device.startswith("cuda")
                   else f"the CPU ({_count(torch.get_num_threads(), 'thread')})")
    o = cfg.optim
    lines = [
        "# maskedssl demo",
        "",
        (f"{method_names[cfg.method.method]} pretrained on the embedded synthetic data "
         f"({cfg.data.data.split(':')[1]} images of 32 px, 10 classes: {DEMO_CLASSES}; colour, position, "
         f"scale and rotation vary) with the `micro` preset (ViT, 96 wide, 4 blocks, patch 4): "
         f"{_count(o.epochs, 'epoch')} of batch {o.batch_size}, peak lr {o.lr:g}, "
         f"in {train_seconds:.0f} s on {device_name}; the whole demo took {total_seconds:.0f} s."),
        "",
        f"Training loss: {losses[0]:.3f} at the first record, {losses[-1]:.3f} at the last." if losses
        else "",
        "",
        ("Frozen features (probe fitted on up to 2000 training images, scored on the held-out split), "
         "against the same network at its random initialisation:"),
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        row("linear probe, mean of patch tokens", lambda r: r["probe_mean"]),
        row("k-NN (k=20), mean of patch tokens", lambda r: r["knn_mean"]),
        row("normalized-cut foreground vs true object patches (IoU)", lambda r: r["clustering"]["fg_iou"],
            "{:.3f}"),
        row("training mask vs object patches (IoU)", lambda r: r["clustering"]["mask_iou"], "{:.3f}"),
        row("share of object patches masked", lambda r: r["clustering"]["mask_object_coverage"], "{:.1%}"),
        "",
        ("Chance is 10% for the probes. The IoU rows use the ground-truth object masks the synthetic data "
         "carries: random masks cover about the mask ratio of the object; informed masks aim at it first."),
        "",
        _probe_verdict(results),
        "",
    ]
    captions = {"reconstruction": "Reconstructions (top: input; middle: what the encoder sees; bottom: the "
                                  "model's reconstruction)",
                "masks": "Masks: random (MAE) and informed (Self-guided MAE) with the normalized-cut "
                         "bi-partition, and the true objects",
                "loss": "Loss and learning rate"}
    for key, path in pictures.items():
        lines += [f"### {captions.get(key, key)}", "", f"![{key}]({Path(path).relative_to(out)})", ""]
    lines += ["Reproduce or extend:", "", "```bash",
              f"maskedssl pretrain --config {out / 'config.json'} --epochs {o.epochs}",
              f"maskedssl evaluate --ckpt {out / train_lib.CHECKPOINT_NAME} --data {cfg.data.data}",
              "```", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskedssl", description="Masked-image-modeling pretraining "
                                     "(MAE, i-MAE, Self-guided MAE) on fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pretrain a model", argument_default=argparse.SUPPRESS,
                       description="Pretrain MAE / i-MAE / Self-guided MAE. Multi-GPU: torchrun "
                       "--nproc_per_node N -m maskedssl pretrain ...")
    p.set_defaults(func=cmd_pretrain)
    p.set_defaults(config_keys=add_pretrain_arguments(p))

    from . import evaluate
    if hasattr(evaluate, "add_arguments") and hasattr(evaluate, "main"):
        e = sub.add_parser("evaluate", help="evaluate a checkpoint (probe, k-NN, separability, clustering)")
        evaluate.add_arguments(e)
        e.set_defaults(func=evaluate.main)

    d = sub.add_parser("demo", help="the main job in minutes on a CPU: pretrain, probe, report.md")
    add_demo_arguments(d)
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        _error(str(err))
        return 2
    except DatasetError as err:
        _error(str(err), per_process=True)
        return 2
    except TrainingDiverged as err:
        _error(str(err))
        return 1
    except KeyboardInterrupt:
        _error("interrupted; continue the run with --resume auto")
        return 130


if __name__ == "__main__":
    sys.exit(main())
