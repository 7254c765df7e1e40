"""Pretraining: MAE, i-MAE or Self-guided MAE on one device or many (torchrun), readable top to bottom.

    config -> distributed setup -> data -> model (+ i-MAE teacher) -> AdamW -> resume -> loop -> pictures

One optimizer step = ``accum_iter`` micro-batches of ``batch_size`` images per process. The learning rate
follows MAE: ``lr = blr * batch_size * accum_iter * world_size / 256``, linear warm-up then a half-cosine,
set every step. Outputs under ``--out``: ``checkpoint.pt`` (written atomically; everything needed to
continue bit-exactly), ``metrics.jsonl``, ``tb/`` (TensorBoard), ``config.json`` and pictures (viz.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import data as data_lib

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------------------------------
# Configuration: one small dataclass per concern; the CLI exposes every field

def opt(default, help: str):
    """A config field with its command-line help (the CLI turns every field into a flag)."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """What to train on and how to feed it."""

    data: str = opt("synthetic", "synthetic[:N] | cifar10:PATH | cifar100:PATH | imagefolder:PATH")
    num_workers: int = opt(-1, "DataLoader workers (ImageFolder only); -1: this process's share of the "
                           "CPU cores less one, at most 8")
    crop_scale_min: float = opt(0.2, "RandomResizedCrop's smallest area fraction (MAE: 0.2)")
    pairing: str = opt("labels", "i-MAE partners by: labels | kmeans (cluster ids of the current features)")
    same_prob: float = opt(1.0, "i-MAE: probability that a partner shares the sample's class (or cluster); "
                                "with labels, batches are made of same-class pairs so that one is there "
                                "(the log's partner_same_class is the share reached)")
    kmeans_k: int = opt(10, "i-MAE with --pairing kmeans: clusters of each process's batch (fewer than "
                        "--batch-size)")


@dataclass
class MethodConfig:
    """Which model, with which objective options."""

    method: str = opt("mae", "mae | imae | sgmae")
    model: str = opt("micro", "architecture preset (maskedssl.models.PRESETS)")
    options: dict = opt({}, "the method config's fields (models: MAEConfig, IMAEConfig, SGMAEConfig), "
                            "and architecture overrides")
    teacher: str | None = opt(None, "i-MAE: an MAE checkpoint, the frozen distillation teacher")


@dataclass
class OptimConfig:
    """AdamW and its schedule, as MAE."""

    epochs: int = opt(20, "epochs (the schedule spans them)")
    batch_size: int = opt(64, "images per process per micro-batch")
    accum_iter: int = opt(1, "micro-batches per optimizer step (gradient accumulation)")
    blr: float = opt(1.5e-4, "base learning rate: lr = blr * effective batch / 256")
    lr: float | None = opt(None, "absolute learning rate (overrides --blr)")
    min_lr: float = opt(0.0, "learning rate at the end of the cosine")
    weight_decay: float = opt(0.05, "AdamW weight decay (none on biases and norms, as MAE)")
    warmup_epochs: float = opt(2.0, "linear warm-up, in epochs")
    clip_grad: float | None = opt(None, "max gradient norm (MAE pretraining clips none)")


@dataclass
class RunConfig:
    """Where and how this run executes."""

    out: str = opt("runs/pretrain", "output folder: checkpoint, metrics, TensorBoard logs, pictures")
    seed: int = opt(0, "random seed (process r uses seed + r)")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    precision: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    compile: bool = opt(False, "torch.compile the model")
    backend: str | None = opt(None, "kernel backend of maskedssl.ops: auto | torch | triton | cuda")
    resume: str | None = opt(None, "continue from a checkpoint; 'auto': OUT/checkpoint.pt when it exists")
    max_steps: int | None = opt(None, "stop after this many optimizer steps in all (the schedule still spans "
                                      "the epochs; --resume continues)")
    save_every_steps: int = opt(0, "also checkpoint every N optimizer steps (0: at epoch ends only)")
    log_every: int = opt(10, "optimizer steps between metric records")
    pictures: bool = opt(True, "draw reconstructions, masks and loss curves (PNG under OUT)")
    viz_every: int = opt(0, "epochs between pictures (0: at the end only)")
    tensorboard: bool = opt(True, "write TensorBoard logs under OUT/tb")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From nested sections ``{"data": {...}, "optim": {...}, ...}``, each key a field name."""
        sections = {"data": DataConfig, "method": MethodConfig, "optim": OptimConfig, "run": RunConfig}
        unknown = set(d) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected {sorted(sections)}")
        kwargs = {}
        for name, section in sections.items():
            values = d.get(name, {})
            fields = {f.name for f in dataclasses.fields(section)}
            if not isinstance(values, dict):
                raise ConfigError(f"section {name!r} must be a table of keys, got {values!r}")
            if set(values) - fields:
                raise ConfigError(f"unknown key(s) {sorted(set(values) - fields)} in section {name!r}; "
                                  f"expected {sorted(fields)}")
            kwargs[name] = section(**values)
        return cls(**kwargs)


class ConfigError(ValueError):
    """A configuration that cannot run; the CLI prints it as one line."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""


# ----------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain run is world size 1

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    want_cuda = device_arg != "cpu" and torch.cuda.is_available()
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device_arg}: CUDA is not available here")
    if d.enabled:
        device = torch.device("cuda", d.local_rank) if want_cuda else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        device = torch.device(device_arg if device_arg != "auto" else ("cuda" if want_cuda else "cpu"))
    return d, device


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a tensor over processes (itself on one)."""
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world_size
    return value


# ----------------------------------------------------------------------------------------------------
# Model, optimizer and schedule

def build_model(cfg: MethodConfig, img_size: int | None = None) -> torch.nn.Module:
    """The method's model for ``cfg`` (with its teacher loaded when i-MAE names one)."""
    from . import models

    options = dict(cfg.options)
    if cfg.teacher is not None:
        # the heads start from its decoder_embed and distil towards it: a random one would be a silent failure
        teacher = load_model(cfg.teacher, preset=cfg.model, method="mae",
                             required=("decoder_embed.weight", "decoder_embed.bias"))
        options["teacher"] = teacher.eval().requires_grad_(False)
    try:
        return models.build_model(cfg.method, cfg.model, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model: {err}") from None


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every trained tensor but biases and other 1-D ones (norms), as facebookresearch/mae
    groups them (timm's ``param_groups_weight_decay`` with no exceptions): the cls and mask tokens are
    decayed; the sin-cos position embeddings are not trained."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to ``base_lr``, then half-cosine to ``min_lr``, by optimizer step (as MAE's
    ``adjust_learning_rate`` by fractional epoch)."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, weights_only loads, every RNG the run draws from

def rng_state(aug_gen: torch.Generator) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # weights_only loading accepts tensors and plain containers, not numpy arrays
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "augment": aug_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, aug_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    aug_gen.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_atomic(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` through ``write_atomic``."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_atomic(path: Path, write) -> None:
    """``write(f)`` into a temporary file in the same folder, flush it to disk, then rename it over
    ``path``: a crash leaves either the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def keep_records_until(path: Path, step: int) -> None:
    """Drop the records of ``path`` (JSON lines) logged after ``step``, and a line torn by a crash."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] <= step:
            kept.append(line)
    write_atomic(path, lambda f: f.write("".join(f"{line}\n" for line in kept).encode()))


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint file, or a run's folder holding one (OUT/checkpoint.pt), loaded weights-only."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / CHECKPOINT_NAME).is_file():
            raise ConfigError(f"{path} is a folder without a {CHECKPOINT_NAME}")
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, not a torch file, unsafe pickle
        # the CLI prints one line; torch.load's unpickling message is a paragraph of advice
        from .models.mae import refused_objects

        reason = refused_objects(err)
        if reason is None and isinstance(err, pickle.UnpicklingError):
            reason = "not a PyTorch file of tensors and plain containers"
        elif reason is None:
            reason = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"checkpoint {path} cannot be read ({type(err).__name__}: {reason})") from None


def load_state(model: torch.nn.Module, state: dict, what: str) -> None:
    """``model.load_state_dict(state)`` (strict), or a one-line ConfigError saying which keys do not fit."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = [f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("keys of another shape", reshaped)) if keys]
    if problems:
        raise ConfigError(f"{what}: " + "; ".join(problems))
    model.load_state_dict(state)


def load_model(path: str | Path, preset: str | None = None, method: str | None = None,
               map_location: str | torch.device = "cpu", required: tuple[str, ...] = ()) -> torch.nn.Module:
    """A pretrained model, in eval mode on ``map_location``, from our checkpoint (its config says what to
    build) or from an official facebookresearch/mae one (``preset`` names the architecture, else the
    matching preset is found; a missing decoder stays at its initialisation unless ``required`` names
    its keys: then their absence is a ConfigError)."""
    from . import models

    ckpt = load_checkpoint(path)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    saved = ckpt["config"]["method"] if isinstance(ckpt, dict) and "config" in ckpt else None
    if saved is not None and method is not None and method != saved["method"]:
        # before the key check: an i-MAE checkpoint lacks the MAE keys a teacher needs, but that is not why
        raise ConfigError(f"{path} holds a {saved['method']} model, not {method}")
    absent = [k for k in required if isinstance(state, dict) and k not in state]
    if absent:
        raise ConfigError(f"{path} has no {', '.join(absent)} (an encoder-only checkpoint?), which this use "
                          "of it needs")
    if saved is not None:
        model = build_model(MethodConfig(saved["method"], saved["model"], saved["options"]))
        # an i-MAE teacher is frozen and loaded from its own file: not part of the model
        state = {k: v for k, v in ckpt["model"].items() if not k.startswith("teacher.")}
        load_state(model, state, f"{path} does not fit {saved['method']}/{saved['model']}")
    else:
        if method not in (None, "mae"):
            raise ConfigError(f"{path} is not a maskedssl checkpoint; only an MAE can load it")
        try:
            model = models.MAE.from_official(path, preset, strict=False)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return model.to(map_location).eval()


# ----------------------------------------------------------------------------------------------------
# The run

def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full fp32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16, fp16 or fp32, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a GPU (use bf16 or fp32 on the CPU)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def partners_for(cfg: DataConfig, raw_model, imgs: torch.Tensor, labels: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:
    """i-MAE partners: semantic pairing on labels, or on k-means cluster ids of the current features."""
    if cfg.pairing == "kmeans":
        with torch.no_grad():
            feats = raw_model.forward_features(imgs, pool="mean")
        labels = data_lib.kmeans(feats, cfg.kmeans_k, generator=gen)
    return data_lib.sample_partners(labels, cfg.same_prob, gen)


def _type_mismatch(value, hint) -> str | None:
    """What ``value`` should be for the type hint ``hint`` (int, float, str, bool, dict, tuples and their
    Optionals), or None when it is one. Config files can hold anything; flags are parsed already."""
    import typing

    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    if origin in (tuple, list):
        if isinstance(value, (tuple, list)) and all(_type_mismatch(v, float) is None for v in value):
            return None
        return "a list of numbers"
    if origin is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif origin is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, origin)
    return None if ok else {float: "a number", int: "an integer", str: "a string", bool: "true or false",
                            dict: "a table of keys"}.get(origin, origin.__name__)


def validate(cfg: TrainConfig) -> None:
    import typing

    o, d, m, r = cfg.optim, cfg.data, cfg.method, cfg.run
    for section in (d, m, o, r):
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            wanted = _type_mismatch(getattr(section, f.name), hints[f.name])
            if wanted:
                raise ConfigError(f"{f.name} must be {wanted}, got {getattr(section, f.name)!r}")
    if m.method not in ("mae", "imae", "sgmae"):
        raise ConfigError(f"method must be mae, imae or sgmae, got {m.method!r}")
    from .ops._backend import BACKENDS, requested_backend

    if r.backend is not None and r.backend not in BACKENDS:  # the flag has choices; a config file not
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {r.backend!r}")
    if r.backend is None:
        try:  # MASKEDSSL_BACKEND, checked before any work rather than at the first op
            requested_backend(None)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    # `not value >= low` rather than `value < low`, so that NaN fails too
    for section, name, low in ((o, "epochs", 1), (o, "batch_size", 1), (o, "accum_iter", 1),
                               (o, "blr", 0), (o, "lr", 0), (o, "min_lr", 0), (o, "weight_decay", 0),
                               (o, "warmup_epochs", 0),
                               (r, "log_every", 1), (r, "save_every_steps", 0), (r, "viz_every", 0),
                               (r, "max_steps", 1), (d, "num_workers", -1), (d, "kmeans_k", 1)):
        value = getattr(section, name)
        if value is not None and not (low <= value < math.inf):
            raise ConfigError(f"{name} must be >= {low}{' and finite' if value == math.inf else ''}, "
                              f"got {value}")
    if not 0 <= r.seed < 2**31:  # numpy seeds must fit in 32 bits, and each process adds its rank
        raise ConfigError(f"seed must be in [0, 2**31), got {r.seed}")
    if o.clip_grad is not None and not 0 < o.clip_grad < math.inf:
        # a negative max norm makes clip_grad_norm_ scale every gradient by a negative factor
        raise ConfigError(f"clip_grad must be positive and finite (or None), got {o.clip_grad}")
    from . import models

    if m.model not in models.PRESETS:
        raise ConfigError(f"unknown model preset {m.model!r}; choose one of {sorted(models.PRESETS)}")
    own = models.METHODS[m.method].config_class
    hints = {**typing.get_type_hints(models.ModelConfig), **typing.get_type_hints(own)}
    hints.pop("arch")
    bad = sorted(set(m.options) - set(hints))
    if bad:
        raise ConfigError(f"option(s) {', '.join(bad)} do not apply to method {m.method} ({own.__name__})")
    for name, value in m.options.items():
        wanted = _type_mismatch(value, hints[name])
        if wanted:
            raise ConfigError(f"option {name} must be {wanted}, got {value!r}")
    if m.teacher is not None and m.method != "imae":
        raise ConfigError("a teacher applies to method imae only")
    distill = sorted(k for k in m.options if k.startswith("distill_"))
    if distill and m.teacher is None:
        # without a teacher there is no distillation term: a weight set for it would change nothing
        raise ConfigError(f"option(s) {', '.join(distill)} weight the distillation losses: "
                          "they need a teacher")
    if d.pairing not in ("labels", "kmeans"):
        raise ConfigError(f"pairing must be labels or kmeans, got {d.pairing!r}")
    if not 0 <= d.same_prob <= 1:
        raise ConfigError(f"same_prob must be in [0, 1], got {d.same_prob}")
    # as a model option of another method is refused: a partner option would change nothing
    set_options = [f.name for f in dataclasses.fields(DataConfig)
                   if f.name in ("pairing", "same_prob", "kmeans_k") and getattr(d, f.name) != f.default]
    if set_options and m.method != "imae":
        raise ConfigError(f"{', '.join(set_options)} choose i-MAE's partners: they apply to method imae only")
    if m.method == "imae" and d.pairing == "kmeans" and d.kmeans_k >= o.batch_size:
        # each process clusters its own batch: with as many clusters as images, every image is alone
        raise ConfigError(f"kmeans_k={d.kmeans_k} clusters of a batch of {o.batch_size} images leave each "
                          f"image its own cluster (random partners): use kmeans_k < batch_size")
    if not 0 < d.crop_scale_min <= 1:
        raise ConfigError(f"crop_scale_min must be in (0, 1], got {d.crop_scale_min}")
    try:
        kind = torch.device(r.device if r.device != "auto" else "cpu").type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):  # meta, mps, ... passed, then failed with a traceback
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {r.device!r}")


def train(cfg: TrainConfig, model: torch.nn.Module | None = None) -> dict:
    """Run (or continue) the pretraining ``cfg`` describes; returns a summary dict. ``model`` replaces the
    one the config would build (tests)."""
    from .ops._backend import ENV_VAR

    validate(cfg)
    d, device = setup_distributed(cfg.run.device)
    previous = os.environ.get(ENV_VAR)
    if cfg.run.backend is not None:
        os.environ[ENV_VAR] = cfg.run.backend  # every op reads it (maskedssl.ops._backend); for this run only
    try:
        return _train(cfg, d, device, model)
    finally:
        if cfg.run.backend is not None:
            if previous is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = previous
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: Dist, device: torch.device, model: torch.nn.Module | None) -> dict:
    o, r = cfg.optim, cfg.run
    out = Path(r.out).expanduser()  # "~/runs" from a config file made a folder named ~
    ckpt_path = out / CHECKPOINT_NAME
    amp_dtype = pick_precision(r.precision, device)

    # Each process draws its own masks and crops; the seed offset keeps them from repeating each other.
    seed = r.seed + d.rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed)  # crops, flips, partners: on the CPU, device-independent

    # ---- model first: its input size decides the data's
    if model is None:
        model = build_model(cfg.method)
    model = model.to(device)
    img_size = model.img_size
    stats = data_lib.pixel_stats(model)  # its config's mean/std (ImageNet's by default), as evaluation uses

    # ---- data
    try:
        train_set = data_lib.build_dataset(cfg.data.data, train=True, img_size=img_size, seed=r.seed,
                                           crop_scale_min=cfg.data.crop_scale_min)
    except data_lib.DatasetError as err:
        raise ConfigError(str(err)) from None
    # torchvision's ImageFolder loader converts every image to RGB
    channels = train_set.images.shape[1] if hasattr(train_set, "images") else 3
    if channels != getattr(model, "in_chans", channels):
        raise ConfigError(f"{cfg.data.data} has {channels}-channel images but the model takes "
                          f"in_chans={model.in_chans}")
    # i-MAE draws partners from the batch: batches of same-class pairs hold a same-class one for every sample
    pairs = cfg.method.method == "imae" and cfg.data.pairing == "labels" and cfg.data.same_prob > 0
    sampler = data_lib.EpochSampler(len(train_set), o.batch_size, d.rank, d.world_size, seed=r.seed,
                                    pair_labels=data_lib.dataset_labels(train_set) if pairs else None)
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else data_lib.default_workers(d.world_size)
    loader = data_lib.make_loader(train_set, sampler, workers, device, seed=seed)
    steps_per_epoch = sampler.num_batches // o.accum_iter
    if steps_per_epoch == 0:
        raise ConfigError(f"one epoch holds {sampler.num_batches} batches, "
                          f"fewer than accum_iter={o.accum_iter}")
    total_steps = o.epochs * steps_per_epoch
    warmup_steps = round(o.warmup_epochs * steps_per_epoch)
    eff_batch = o.batch_size * o.accum_iter * d.world_size
    base_lr = o.lr if o.lr is not None else o.blr * eff_batch / 256
    for name, value in (("the learning rate", base_lr), ("min_lr", o.min_lr)):
        if not value <= torch.finfo(torch.float32).max:  # AdamW keeps it in float32 on some paths
            raise ConfigError(f"{name} {value:g} is too large for float32 (at most 3.4e38)")

    # ---- optimizer, scaler
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=base_lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # ---- resume
    epoch, step, step_in_epoch = 0, 0, 0
    resume = r.resume
    if resume == "auto":
        resume = str(ckpt_path) if ckpt_path.is_file() else None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        needed = ("model", "optimizer", "scaler", "epoch", "step", "step_in_epoch", "rng")
        if not isinstance(ckpt, dict) or not all(k in ckpt for k in needed):
            have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ConfigError(f"{resume} is not a maskedssl training checkpoint (it needs "
                              f"{', '.join(needed)}; has {have})")
        saved = ckpt.get("config")
        saved = saved.get("method") if isinstance(saved, dict) else None
        saved = saved if isinstance(saved, dict) else {}
        does_not_fit = (f"{resume} holds a {saved.get('method')}/{saved.get('model')} model that does not "
                        f"fit {cfg.method.method}/{cfg.method.model}")
        if saved.get("method", cfg.method.method) != cfg.method.method:
            # MAE and Self-guided MAE share their weights' layout, not their run: a resume continues one run
            raise ConfigError(does_not_fit + " (a resume continues the same method's run)")
        load_state(model, ckpt["model"], does_not_fit)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise ConfigError(f"{resume}: its optimizer state does not fit this model ({err})") from None
        # load_state_dict restores the saved hyperparameters; lr is set every step, weight decay here,
        # so a resumed run uses this config's
        for group, fresh in zip(optimizer.param_groups, param_groups(model, o.weight_decay)):
            group["weight_decay"] = fresh["weight_decay"]
        if ckpt["scaler"]:  # empty when saved without fp16: a fresh scale then
            scaler.load_state_dict(ckpt["scaler"])
        epoch, step, step_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"]
        saved_per_step = ckpt.get("images_per_step", eff_batch)  # (checkpoints before it: the same)
        if saved_per_step != eff_batch:
            # another number of processes, batch size or accumulation: the saved step counts steps of
            # another size, so the schedule and the sampler's skip would land elsewhere in training (1 ->
            # 2 processes ran the second half at lr 0 and skipped twice the images read). Continue where
            # the run was: the same epoch, after the images it had read (at most one step is read again;
            # every process count reads a prefix of the same global order)
            step_in_epoch = step_in_epoch * saved_per_step // eff_batch
        if step_in_epoch >= steps_per_epoch:
            # the saved epoch was longer (more images, smaller batches): here it is over. Left as it was,
            # no step would run and the epoch would never end (a hang)
            epoch, step_in_epoch = epoch + 1, 0
        if saved_per_step != eff_batch:
            step = epoch * steps_per_epoch + step_in_epoch
            if d.main:
                print(f"resuming with {eff_batch} images per step instead of {saved_per_step}: epoch "
                      f"{epoch + 1}, step {step} of this run's {total_steps}", file=sys.stderr)
        rngs = ckpt["rng"]
        if not isinstance(rngs, (list, tuple)):
            raise ConfigError(f"{resume}: its 'rng' entry is not a list of random states")
        if len(rngs) == d.world_size:
            try:
                set_rng_state(rngs[d.rank], aug_gen)
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise ConfigError(f"{resume}: its random state cannot be restored ({err})") from None
        elif d.main:
            print(f"resuming on {d.world_size} processes from a run on {len(rngs)}: random streams restart",
                  file=sys.stderr)
    last_good = ckpt_path if resume is not None and Path(resume).expanduser() == ckpt_path else None

    # ---- wrap: compile, then DDP (DDP's optimizer splits the compiled graph at its buckets)
    raw_model = model
    if r.compile:
        model = torch.compile(model)
    if d.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- logging (rank 0)
    writer, metrics_file = None, None
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create the output folder {out}: {err.strerror}") from None
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if resume is not None:  # an interrupted run logged steps past its checkpoint: they run again
            keep_records_until(out / "metrics.jsonl", step)
        metrics_file = open(out / "metrics.jsonl", "a" if resume is not None else "w")
        if r.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tb"), purge_step=step if step else None)

    def log(record: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if writer is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    writer.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def save_checkpoint() -> None:
        nonlocal last_good
        # a step with a finite loss can still leave inf/NaN weights (an overflowing update): never save
        # those as the run's last good state
        if not bool(torch.stack([torch.isfinite(p).all() for p in raw_model.parameters()]).all()):  # one sync
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
            raise TrainingDiverged(f"the weights are no longer finite after step {step}: stopping ({where})")
        rngs = [rng_state(aug_gen)]
        if d.enabled:
            rngs = [None] * d.world_size
            dist.all_gather_object(rngs, rng_state(aug_gen))
        if d.main:
            save_atomic({
                "format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "step_in_epoch": step_in_epoch, "rng": rngs,
                "images_per_step": eff_batch,
            }, ckpt_path)
            last_good = ckpt_path

    # ---- the loop
    if d.main:
        print(f"pretraining {cfg.method.method}/{cfg.method.model} on {cfg.data.data} "
              f"({len(train_set)} images) | {d.world_size} x {device} | "
              f"{o.epochs} epochs x {steps_per_epoch} steps | "
              f"batch {eff_batch} | lr {base_lr:.3g}", file=sys.stderr)
        if cfg.method.method == "imae" and cfg.method.teacher is None:
            print("i-MAE without --teacher: no distillation terms, the heads start untrained (the paper's "
                  "ablation without the teacher)", file=sys.stderr)
    viz_batch = _viz_batch(cfg, train_set) if d.main else None
    model.train()
    stopped, status = False, "done"
    if r.max_steps is not None and step >= r.max_steps:  # resumed from a run that already got there
        stopped, status = True, f"stopped at max_steps={r.max_steps}"
        if d.main:  # its config.json keeps max_steps: a resume with it alone has nothing to do
            print(f"the checkpoint is at step {step}, past max_steps={r.max_steps}: pass a larger "
                  "--max-steps, or --max-steps none, to continue", file=sys.stderr)
    tic, seen, window = time.perf_counter(), 0, []
    run_start = time.perf_counter()
    while epoch < o.epochs and not stopped:
        sampler.set_epoch(epoch, skip_batches=step_in_epoch * o.accum_iter)
        if isinstance(loader, torch.utils.data.DataLoader):
            loader.generator.manual_seed(seed * 100_003 + epoch)  # worker seeds: a function of (seed, epoch)
        bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{o.epochs}",
                   disable=not (d.main and r.progress), leave=False, dynamic_ncols=True, file=sys.stderr)
        batches = iter(loader)
        while step_in_epoch < steps_per_epoch:
            lr = lr_at(step, base_lr, o.min_lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses_sum: dict[str, torch.Tensor] = {}
            for micro in range(o.accum_iter):
                try:
                    imgs, labels = next(batches)
                except data_lib.DatasetError as err:  # an unreadable image; from a worker, with its traceback
                    # (this process's own: under torchrun the others may not meet it: a DatasetError, which
                    # the CLI reports from every process)
                    raise data_lib.DatasetError(data_lib.error_line(err)) from None
                imgs = imgs.to(device, non_blocking=True)
                if train_set.augmented_on_cpu and imgs.shape[-2:] == (img_size, img_size):
                    # cropped on the CPU already: the model normalises the uint8 batch with the same
                    # statistics inside mix_patchify, reading a quarter of the bytes of a float copy
                    x = imgs
                elif train_set.augmented_on_cpu:
                    x = data_lib.normalize_batch(imgs, img_size, *stats)
                else:
                    x = data_lib.augment_batch(imgs, img_size, aug_gen, (cfg.data.crop_scale_min, 1.0),
                                               mean=stats[0], std=stats[1])
                partner = None
                if cfg.method.method == "imae":
                    partner = partners_for(cfg.data, raw_model, x, labels, aug_gen)
                    # the share of partners of the sample's class, as the log reports it
                    same_class = (labels[partner] == labels).float().mean().to(device)
                    losses_sum["partner_same_class"] = (losses_sum.get("partner_same_class", 0.0)
                                                        + same_class / o.accum_iter)
                    partner = partner.to(device)
                # gradients are all-reduced only on the last micro-batch of a step
                last_micro = micro == o.accum_iter - 1
                sync = model.no_sync() if d.enabled and not last_micro else contextlib.nullcontext()
                with sync, torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                          enabled=amp_dtype is not None):
                    # past 1 after a resume into shorter epochs (a smaller dataset, more processes)
                    result = model(x, partner=partner, progress=min(1.0, step / total_steps))
                    # all processes see the same value, so all stop together on a NaN
                    loss_value = all_mean(result.loss.detach().float(), d).item()
                    if not math.isfinite(loss_value):
                        bar.close()
                        where = (f"last good checkpoint: {last_good}" if last_good
                                 else "no checkpoint was written yet")
                        raise TrainingDiverged(f"loss is {loss_value} at epoch {epoch + 1}, step {step}: "
                                               f"stopping ({where})")
                    scaler.scale(result.loss / o.accum_iter).backward()
                for k, v in result.losses.items():
                    losses_sum[k] = losses_sum.get(k, 0.0) + v.detach().float() / o.accum_iter
            if o.clip_grad is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), o.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_in_epoch += 1
            seen += eff_batch
            window.append({k: v for k, v in losses_sum.items()})
            bar.update(1)

            if step % r.log_every == 0 or step_in_epoch == steps_per_epoch:
                mean = {k: all_mean(torch.stack([w[k] for w in window]).mean(), d).item() for k in window[0]}
                elapsed = time.perf_counter() - tic
                record = {"kind": "train", "epoch": epoch + step_in_epoch / steps_per_epoch, "step": step,
                          "lr": lr, "img_per_s": seen / elapsed, **mean}
                log(record)
                bar.set_postfix(loss=f"{mean.get('loss', loss_value):.4f}", lr=f"{lr:.2e}",
                                img_s=f"{seen / elapsed:.0f}", refresh=False)
                tic, seen, window = time.perf_counter(), 0, []
            if r.max_steps is not None and step >= r.max_steps:
                stopped, status = True, f"stopped at max_steps={r.max_steps}"
                break
            if r.save_every_steps and step % r.save_every_steps == 0 and step_in_epoch < steps_per_epoch:
                save_checkpoint()
        bar.close()
        if step_in_epoch == steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
            if d.main:
                print(f"epoch {epoch}/{o.epochs}: loss {mean.get('loss', float('nan')):.4f} "
                      f"({time.perf_counter() - run_start:.0f} s)", file=sys.stderr)
            if d.main and r.pictures and r.viz_every and epoch % r.viz_every == 0 and epoch < o.epochs:
                _pictures(raw_model, viz_batch, out, cfg, tag=f"_epoch{epoch}")
        save_checkpoint()

    pictures = {}
    if d.main:
        if r.pictures:
            pictures = _pictures(raw_model, viz_batch, out, cfg)
        summary = {"kind": "summary", "status": status, "epoch": epoch, "step": step,
                   "seconds": time.perf_counter() - run_start, "checkpoint": str(ckpt_path),
                   "pictures": {k: str(v) for k, v in pictures.items()}}
        log(summary)
        metrics_file.close()
        if writer is not None:
            writer.close()
        return summary
    return {"status": status, "epoch": epoch, "step": step}


# ----------------------------------------------------------------------------------------------------
# Pictures (rank 0): a fixed batch of training images, with object masks when the data has them

def _viz_batch(cfg: TrainConfig, dataset, n: int = 8) -> dict:
    """The first n images, loaded on a random stream of their own: a dataset with random transforms
    (ImageFolder's crops) would otherwise draw from the stream the masks come from, and a resumed run,
    which loads these again, would mask differently from an uninterrupted one."""
    idx = list(range(min(n, len(dataset))))
    seeded = data_lib.SeededItems(dataset)
    try:
        items = [seeded[(i, cfg.run.seed + i)] for i in idx]
    except data_lib.DatasetError as err:
        raise ConfigError(str(err)) from None
    imgs = torch.stack([img for img, _ in items])
    labels = torch.tensor([label for _, label in items])
    masks = torch.stack([dataset.object_mask(i) for i in idx]) if hasattr(dataset, "object_mask") else None
    return {"imgs": imgs, "labels": labels, "object_masks": masks}


def _pictures(model, batch: dict, out: Path, cfg: TrainConfig, tag: str = "") -> dict:
    """Pictures on their own random streams, so drawing them never changes the run's."""
    from . import viz

    cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = [torch.cuda.current_device()] if cuda_in_use else []
    with torch.random.fork_rng(devices=devices):
        return viz.write_pictures(model, batch, out, method=cfg.method.method, tag=tag, seed=cfg.run.seed)
