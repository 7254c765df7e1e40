"""maskedssl.train: schedule, weight decay groups, atomic checkpoints, exact resume, NaN stop, outputs."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from maskedssl import models, viz
from maskedssl import train as T
from maskedssl.data import build_dataset

# a network small enough for many short CPU runs: 16 px, patch 4 -> 16 patches, width 32, one block each
TINY = {"img_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_embed_dim": 32,
        "decoder_depth": 1, "decoder_num_heads": 2}


def tiny_config(out, method="mae", epochs=2, **run) -> T.TrainConfig:
    run = {"tensorboard": False, "progress": False, "log_every": 1, "pictures": False, **run}
    return T.TrainConfig(
        data=T.DataConfig(data="synthetic:96"),
        method=T.MethodConfig(method, "micro", dict(TINY)),
        optim=T.OptimConfig(epochs=epochs, batch_size=16, accum_iter=2, blr=1e-2, warmup_epochs=1),
        run=T.RunConfig(out=str(out), **run))


def load_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------- pieces

def test_lr_schedule_warmup_then_cosine():
    lrs = [T.lr_at(s, 1.0, 0.1, 10, 110) for s in range(111)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)
    assert lrs[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_weight_decay_as_mae_groups_it():
    model = models.build_model("mae", "micro", **TINY)
    no_decay, decay = T.param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    # facebookresearch/mae decays everything but biases and 1-D tensors, its (1, 1, D) tokens included
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "cls_token", "mask_token"} <= decayed
    assert {"norm.weight", "blocks.0.attn.qkv.bias"} <= skipped
    assert not any(n.endswith(("bias", "pos_embed")) or ".norm" in n for n in decayed)
    # fixed sin-cos position embeddings are not trained at all
    assert "pos_embed" not in decayed | skipped


def test_save_atomic_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    T.save_atomic({"x": torch.ones(3)}, path)
    assert torch.equal(load_state(path)["x"], torch.ones(3))

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        T.save_atomic({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_state(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_rng_state_roundtrip_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(5)
    T.save_atomic({"rng": T.rng_state(gen)}, tmp_path / "r.pt")
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item()

    expected = draw()
    T.set_rng_state(load_state(tmp_path / "r.pt")["rng"], gen)
    assert draw() == expected


def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(T.ConfigError, match="does not exist"):
        T.load_checkpoint(tmp_path / "none.pt")
    # a run's folder: its checkpoint.pt (it said "does not exist"), or one line when it has none
    with pytest.raises(T.ConfigError, match="folder without a checkpoint.pt"):
        T.load_checkpoint(tmp_path)
    torch.save({"step": 3}, tmp_path / T.CHECKPOINT_NAME)
    assert T.load_checkpoint(tmp_path) == {"step": 3}
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(T.ConfigError, match="cannot be read"):
        T.load_checkpoint(tmp_path / "bad.pt")
    # torch.load's weights-only refusal is a paragraph; the CLI prints one line
    (tmp_path / "text.pt").write_text('{"kind": "train"}\n')
    with pytest.raises(T.ConfigError, match="cannot be read") as err:
        T.load_checkpoint(tmp_path / "text.pt")
    assert "\n" not in str(err.value)
    import argparse

    torch.save({"model": {}, "args": argparse.Namespace(lr=1e-3)}, tmp_path / "official_train.pth")
    with pytest.raises(T.ConfigError, match=r"argparse\.Namespace object.*'model' entry alone") as err:
        T.load_checkpoint(tmp_path / "official_train.pth")
    assert "\n" not in str(err.value)


def test_the_backend_option_holds_for_the_run_only(tmp_path, monkeypatch):
    """RunConfig.backend reaches the ops through MASKEDSSL_BACKEND during the run, and the variable is as
    it was afterwards (it stayed set: later work in the process ran on the run's backend)."""
    import os

    from maskedssl.ops._backend import ENV_VAR

    seen = []
    inner = T._train
    monkeypatch.setattr(T, "_train", lambda *a: seen.append(os.environ.get(ENV_VAR)) or inner(*a))
    for before in (None, "triton"):
        if before is None:
            monkeypatch.delenv(ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(ENV_VAR, before)
        T.train(tiny_config(tmp_path / str(before), epochs=1, backend="torch"))
        assert os.environ.get(ENV_VAR) == before
    assert seen == ["torch", "torch"]


def test_config_validation():
    cfg = tiny_config("x")
    cfg.method.options["hint_ratio"] = 0.1  # a Self-guided MAE option on MAE
    with pytest.raises(T.ConfigError, match="hint_ratio"):
        T.validate(cfg)
    with pytest.raises(T.ConfigError, match="unknown key"):
        T.TrainConfig.from_dict({"optim": {"epoch": 3}})
    assert T.TrainConfig.from_dict(tiny_config("x").to_dict()) == tiny_config("x")


@pytest.mark.parametrize("section, name, value, message", [
    ("optim", "lr", -1.0, "lr must be >= 0"),  # AdamW raised a bare ValueError with a traceback
    ("optim", "blr", math.nan, "blr must be >= 0"),
    ("optim", "weight_decay", -0.1, "weight_decay"),
    ("optim", "warmup_epochs", -1.0, "warmup_epochs"),
    ("optim", "clip_grad", -1.0, "clip_grad"),  # a negative max norm flipped every gradient's sign
    ("run", "log_every", 0, "log_every"),  # ZeroDivisionError in the loop
    ("run", "save_every_steps", -1, "save_every_steps"),  # saved at every step
    ("run", "viz_every", -1, "viz_every"),  # drew pictures at every epoch
    ("run", "max_steps", 0, "max_steps"),  # ran one step anyway
    ("run", "device", "tpu", "device must be"),  # RuntimeError from torch.device
    ("data", "num_workers", -5, "num_workers"),
    ("data", "kmeans_k", 0, "kmeans_k"),
    # config files can hold any JSON value: each was a TypeError traceback or was taken as truthy
    ("optim", "epochs", "two", "epochs must be an integer"),
    ("optim", "batch_size", 8.5, "batch_size must be an integer"),
    ("optim", "batch_size", True, "batch_size must be an integer"),
    ("run", "compile", "yes", "compile must be true or false"),
    ("data", "same_prob", "x", "same_prob must be a number"),
    ("method", "options", 5, "options must be a table"),
])
def test_config_values_are_checked_before_the_run(section, name, value, message):
    cfg = tiny_config("x")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(T.ConfigError, match=message):
        T.validate(cfg)


def test_partner_options_apply_to_imae_only():
    for name, value in (("same_prob", 0.5), ("pairing", "kmeans"), ("kmeans_k", 3)):
        for method in ("mae", "sgmae"):
            cfg = tiny_config("x", method)
            setattr(cfg.data, name, value)
            with pytest.raises(T.ConfigError, match=f"{name} choose i-MAE's partners"):
                T.validate(cfg)
        cfg = tiny_config("x", "imae")
        setattr(cfg.data, name, value)
        T.validate(cfg)


def test_distillation_weights_need_a_teacher(tmp_path):
    for name in ("distill_sub_weight", "distill_dom_weight"):
        cfg = tiny_config("x", "imae")
        cfg.method.options[name] = 2.0
        with pytest.raises(T.ConfigError, match=f"{name} weight the distillation losses: they need a"):
            T.validate(cfg)
        cfg.method.teacher = str(tmp_path / "teacher.pth")  # read later, by the run, not by validate
        T.validate(cfg)
    cfg = tiny_config("x", "imae")
    cfg.method.options["rec_sub_weight"] = 2.0  # the reconstruction weights need no teacher
    T.validate(cfg)


def test_model_option_types_are_checked():
    cfg = tiny_config("x")
    cfg.method.options["mask_ratio"] = "0.5"
    with pytest.raises(T.ConfigError, match="option mask_ratio must be a number"):
        T.validate(cfg)
    cfg.method.options["mask_ratio"] = 0.5
    cfg.method.options["mean"] = [0.5, 0.5, 0.5]  # a tuple field given as a JSON list is fine
    T.validate(cfg)


def test_data_channels_must_match_the_model(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.method.options["in_chans"] = 1
    with pytest.raises(T.ConfigError, match="3-channel images but the model takes in_chans=1"):
        T.train(cfg)


def test_unwritable_output_folder_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(T.ConfigError, match="cannot create the output folder"):
        T.train(tiny_config(tmp_path / "file" / "run", max_steps=1))


# ---------------------------------------------------------------------------------------------- runs

@pytest.mark.parametrize("method", ["mae", "imae", "sgmae"])
def test_resume_mid_epoch_matches_an_uninterrupted_run(tmp_path, method):
    """Interrupted after 3 optimizer steps (mid-epoch, mid-warm-up), resumed: bit-identical weights and
    optimizer state at the end. sgmae switches to informed masks at 10% of training, i-MAE draws partners
    and mixing weights: every random stream must be restored."""
    whole = T.train(tiny_config(tmp_path / "whole", method))
    assert whole["step"] == 2 * 3  # 96 images / (16 x 2) = 3 steps per epoch
    T.train(tiny_config(tmp_path / "cut", method, max_steps=4))
    part = load_state(tmp_path / "cut" / T.CHECKPOINT_NAME)
    assert (part["epoch"], part["step"], part["step_in_epoch"]) == (1, 4, 1)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:  # a step logged after the checkpoint, and a
        f.write('{"kind": "train", "step": 5, "loss": 1.0}\n{"kind": "tr')  # line torn by the interruption
    T.train(tiny_config(tmp_path / "cut", method, resume="auto"))
    a = load_state(tmp_path / "whole" / T.CHECKPOINT_NAME)
    b = load_state(tmp_path / "cut" / T.CHECKPOINT_NAME)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])
    # the metrics file continues instead of restarting, without the steps the interrupted run logged past
    # its checkpoint (they were logged twice)
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_resume_from_files_that_are_not_training_checkpoints(tmp_path):
    """A bare tensor was a RuntimeError, a dict without the scaler a KeyError: now one line each."""
    T.train(tiny_config(tmp_path / "run", max_steps=1))
    good = load_state(tmp_path / "run" / T.CHECKPOINT_NAME)
    for name, obj, match in [("tensor.pt", torch.zeros(2), "not a maskedssl training checkpoint"),
                             ("partial.pt", {"model": good["model"], "optimizer": good["optimizer"]},
                              "it needs model, optimizer, scaler"),
                             ("rng.pt", {**good, "rng": 5}, "'rng' entry")]:
        torch.save(obj, tmp_path / name)
        with pytest.raises(T.ConfigError, match=match) as err:
            T.train(tiny_config(tmp_path / "run", resume=str(tmp_path / name)))
        assert "\n" not in str(err.value)


def test_seed_and_device_out_of_range_are_config_errors():
    for seed in (-1, 2**32):  # numpy's seed check raised from inside the run
        with pytest.raises(T.ConfigError, match="seed"):
            T.validate(tiny_config("unused", seed=seed))
    for device in ("meta", "nonsense"):  # meta passed, then failed with a traceback
        with pytest.raises(T.ConfigError, match="device"):
            T.validate(tiny_config("unused", device=device))


def test_paths_starting_with_a_tilde_are_in_home(tmp_path, monkeypatch):
    """--out '~/run' (or "out": "~/run" in a config file) made a folder named ~ here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    T.train(tiny_config("~/run", max_steps=1))
    assert (tmp_path / "home" / "run" / T.CHECKPOINT_NAME).is_file() and not (tmp_path / "~").exists()
    summary = T.train(tiny_config("~/run", max_steps=2, resume="~/run/" + T.CHECKPOINT_NAME))
    assert summary["step"] == 2


def test_resume_with_another_step_size_continues_where_the_run_was(tmp_path):
    """Steps of 32 images, resumed with steps of 16 (another accumulation here; another number of
    processes alike): the saved step 4 counted 32-image steps, so the schedule restarted near its start
    and the sampler skipped 16 images where 32 had been read. Now: epoch 2 after its first 32 images."""
    T.train(tiny_config(tmp_path, max_steps=4))  # 3 steps of 2 x 16 per epoch: epoch 2, 1 step in
    cfg = tiny_config(tmp_path, resume="auto")
    cfg.optim.accum_iter = 1  # 6 steps of 16 per epoch, 12 in all
    summary = T.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 9, 10, 11, 12] and summary["step"] == 12  # (was 5 ... 9)


def test_resume_into_shorter_epochs_finishes_instead_of_hanging(tmp_path):
    """Stopped 2 steps into a 3-step epoch, resumed on data with 1-step epochs: step_in_epoch 2 >= 1 ran
    no step and never closed the epoch (an endless loop). The saved epoch now counts as over."""
    T.train(tiny_config(tmp_path, max_steps=2))
    cfg = tiny_config(tmp_path, resume="auto")
    cfg.data.data = "synthetic:32"
    summary = T.train(cfg)
    assert summary["status"] == "done" and summary["epoch"] == 2 and summary["step"] == 3


def test_resume_with_another_model_is_one_config_error(tmp_path):
    T.train(tiny_config(tmp_path, max_steps=1))
    for method, options in (("imae", dict(TINY)), ("mae", {**TINY, "depth": 2})):
        cfg = tiny_config(tmp_path, method, resume="auto")
        cfg.method.options = options
        with pytest.raises(T.ConfigError, match="does not fit") as err:
            T.train(cfg)
        assert "\n" not in str(err.value)
    with pytest.raises(T.ConfigError, match="does not fit"):
        T.load_state(models.build_model("mae", "micro"), models.build_model("imae", "micro").state_dict(),
                     "does not fit")


def test_resume_takes_this_configs_weight_decay(tmp_path):
    T.train(tiny_config(tmp_path, max_steps=1))
    cfg = tiny_config(tmp_path, resume="auto", max_steps=2)
    cfg.optim.weight_decay = 0.3
    T.train(cfg)
    groups = load_state(tmp_path / T.CHECKPOINT_NAME)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.3]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = models.build_model("mae", "micro", **TINY)
    forward = model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 8:  # after epoch 1 (3 steps x 2 micro-batches) and one more step
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    cfg = tiny_config(tmp_path, epochs=3)
    with pytest.raises(T.TrainingDiverged, match=r"loss is nan at epoch 2, step 4.*last good checkpoint"):
        T.train(cfg, model=model)
    ckpt = load_state(tmp_path / T.CHECKPOINT_NAME)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # the NaN step was never applied: the weights in memory are finite too
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_outputs_metrics_tensorboard_and_pictures(tmp_path):
    cfg = tiny_config(tmp_path, "sgmae", epochs=1, tensorboard=True, pictures=True)
    summary = T.train(cfg)
    assert summary["status"] == "done"
    outputs = ("checkpoint.pt", "config.json", "metrics.jsonl", "reconstruction.png", "masks.png", "loss.png")
    for name in outputs:
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tb").iterdir())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert all(math.isfinite(r["loss"]) and r["img_per_s"] > 0 and r["lr"] >= 0 for r in train_records)
    assert records[-1]["kind"] == "summary"
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()
    # the checkpoint rebuilds the model
    model = T.load_model(tmp_path / "checkpoint.pt")
    assert isinstance(model, models.SelfGuidedMAE) and not model.training


@pytest.mark.parametrize("method", ["mae", "imae"])
def test_pictures_for_each_method(tmp_path, method):
    model = models.build_model(method, "micro", **TINY)
    ds = build_dataset("synthetic:4", img_size=16)
    batch = {"imgs": ds.images, "labels": ds.labels, "object_masks": ds.object_masks()}
    paths = viz.write_pictures(model, batch, tmp_path, method)
    assert set(paths) == {"reconstruction", "masks"}  # no metrics.jsonl here: no loss curve
    for p in paths.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert model.training  # restored


def test_imae_teacher_from_an_mae_checkpoint(tmp_path):
    T.train(tiny_config(tmp_path / "mae", epochs=1))
    cfg = tiny_config(tmp_path / "imae", "imae", epochs=1)
    cfg.method.teacher = str(tmp_path / "mae" / T.CHECKPOINT_NAME)
    T.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "imae" / "metrics.jsonl").read_text().splitlines()]
    assert "distill_sub" in records[0] and "rec_dom" in records[0]
    student = T.load_model(tmp_path / "imae" / T.CHECKPOINT_NAME)
    assert isinstance(student, models.IMAE) and student.teacher is None
    with pytest.raises(T.ConfigError, match="holds a mae model"):
        T.load_model(tmp_path / "mae" / T.CHECKPOINT_NAME, method="sgmae")
    # an i-MAE run as the teacher: it lacks an MAE's keys, but the method is why (it was "an encoder-only
    # checkpoint?")
    cfg = tiny_config(tmp_path / "imae2", "imae", epochs=1)
    cfg.method.teacher = str(tmp_path / "imae" / T.CHECKPOINT_NAME)
    with pytest.raises(T.ConfigError, match="holds a imae model, not mae"):
        T.train(cfg)


def test_imae_reaches_its_same_class_share(tmp_path):
    # synthetic:80 holds 8 images of each of 10 classes: batches of same-class pairs give every sample a
    # same-class partner at same_prob = 1; at 0 none shares the class
    for same_prob in (1.0, 0.0):
        cfg = tiny_config(tmp_path / str(same_prob), "imae", epochs=1)
        cfg.data.data, cfg.data.same_prob = "synthetic:80", same_prob
        T.train(cfg)
        lines = (tmp_path / str(same_prob) / "metrics.jsonl").read_text().splitlines()
        shares = [r["partner_same_class"] for r in map(json.loads, lines) if r["kind"] == "train"]
        assert shares and all(share == same_prob for share in shares), shares


def test_kmeans_pairing_runs(tmp_path):
    cfg = tiny_config(tmp_path, "imae", epochs=1)
    cfg.data.pairing, cfg.data.kmeans_k = "kmeans", 3
    assert T.train(cfg)["status"] == "done"
    cfg.data.kmeans_k = cfg.optim.batch_size  # each image its own cluster: partners at random, silently
    with pytest.raises(T.ConfigError, match="kmeans_k < batch_size"):
        T.validate(cfg)


# ---------------------------------------------------------------------------------------------- image folders

def _noise_folder(root, per_class=12, size=(24, 20)):
    """Random-noise PNGs in two class folders: every random crop gives other pixels."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=gen)
            Image.fromarray(pixels.numpy()).save(root / c / f"{i}.png")
    return root


def folder_config(out, data, workers, **run):
    cfg = tiny_config(out, "imae", **run)
    cfg.data.data, cfg.data.num_workers = f"imagefolder:{data}", workers
    cfg.optim.batch_size, cfg.optim.accum_iter = 4, 1  # 24 images: 6 steps per epoch
    return cfg


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_on_an_image_folder_matches_an_uninterrupted_run(tmp_path, workers):
    """Crops drawn on the CPU: the picture batch loaded after the RNG restore moved the masks' stream, and
    the workers' streams restart on a resume. Crops are now seeded per (seed, epoch, image)."""
    data = _noise_folder(tmp_path / "data")
    T.train(folder_config(tmp_path / "whole", data, workers))
    T.train(folder_config(tmp_path / "cut", data, workers, max_steps=3, pictures=True))
    T.train(folder_config(tmp_path / "cut", data, workers, resume="auto", pictures=True))
    a = load_state(tmp_path / "whole" / T.CHECKPOINT_NAME)
    b = load_state(tmp_path / "cut" / T.CHECKPOINT_NAME)
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("where", ["a/00_broken.png", "b/broken.png"])  # among the picture batch's 8, or not
def test_an_unreadable_image_is_one_error_line(tmp_path, where):
    from maskedssl.data import DatasetError

    data = _noise_folder(tmp_path / "data")
    (data / where).write_text("not an image")
    # a ConfigError where every process reads it (the picture batch), a DatasetError where one process
    # may meet it alone (the training batches): the CLI prints the latter from each process
    error = T.ConfigError if where.startswith("a/") else DatasetError
    for workers in (0, 2):
        with pytest.raises(error, match=r"^cannot read image .*broken\.png: ") as err:
            T.train(folder_config(tmp_path / f"out{workers}", data, workers, epochs=1))
        assert "\n" not in str(err.value)


def test_seeded_loading_leaves_the_cuda_generators_alone(tmp_path, monkeypatch):
    """torch.manual_seed also reseeds every CUDA generator (which fork_rng(devices=[]) does not restore):
    a resumed GPU run restarted its mask stream at the picture batch, and every image reseeded it."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    dataset = build_dataset(f"imagefolder:{_noise_folder(tmp_path / 'data')}", train=True, img_size=16)
    T._viz_batch(folder_config(tmp_path / "out", tmp_path / "data", 0), dataset)
    T.data_lib.SeededItems(dataset)[(3, 12345)]
    assert calls == []


# ------------------------------------------------------------------------------------ resume, teacher, stats

def test_resume_into_fewer_steps_than_were_taken(tmp_path):
    """4 steps of 3-step epochs, resumed on data with 1-step epochs: step / total_steps is 4 / 3 (a model's
    progress must stay in [0, 1])."""
    T.train(tiny_config(tmp_path, epochs=3, max_steps=4))
    cfg = tiny_config(tmp_path, epochs=3, resume="auto")
    cfg.data.data = "synthetic:32"
    summary = T.train(cfg)
    assert summary["status"] == "done" and summary["step"] == 5


def test_resume_after_max_steps_takes_no_further_step(tmp_path, capsys):
    T.train(tiny_config(tmp_path, max_steps=2))
    capsys.readouterr()
    summary = T.train(tiny_config(tmp_path, max_steps=2, resume="auto"))
    assert summary["step"] == 2 and summary["status"] == "stopped at max_steps=2"
    # its config.json keeps max_steps: the README's resume command alone stops at once, and says how on
    assert "pass a larger --max-steps, or --max-steps none, to continue" in capsys.readouterr().err


def test_resume_as_another_method_is_a_config_error(tmp_path):
    """MAE and Self-guided MAE have the same weights: only the saved config tells the runs apart."""
    T.train(tiny_config(tmp_path, max_steps=1))
    with pytest.raises(T.ConfigError, match="does not fit sgmae/micro"):
        T.train(tiny_config(tmp_path, "sgmae", resume="auto"))


def test_an_encoder_only_teacher_is_a_config_error(tmp_path):
    """The official encoder-only releases have no decoder_embed: the heads' start and the distillation
    targets would be a random projection."""
    state = models.build_model("mae", "micro", **TINY).state_dict()
    encoder_only = {k: v for k, v in state.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": encoder_only}, tmp_path / "mae_pretrain.pth")
    cfg = tiny_config(tmp_path / "imae", "imae", epochs=1)
    cfg.method.teacher = str(tmp_path / "mae_pretrain.pth")
    with pytest.raises(T.ConfigError, match="has no decoder_embed.weight, decoder_embed.bias"):
        T.train(cfg)


def test_training_normalises_with_the_models_pixel_statistics(tmp_path, monkeypatch):
    seen = []
    augment = T.data_lib.augment_batch

    def spy(*args, **kwargs):
        seen.append((kwargs["mean"], kwargs["std"]))
        return augment(*args, **kwargs)

    monkeypatch.setattr(T.data_lib, "augment_batch", spy)
    cfg = tiny_config(tmp_path, max_steps=1)
    cfg.method.options.update(mean=[0.5, 0.4, 0.3], std=[0.1, 0.2, 0.3])
    T.train(cfg)
    want = torch.tensor([[0.5, 0.4, 0.3], [0.1, 0.2, 0.3]])
    assert seen and all(torch.allclose(torch.tensor(s), want) for s in seen)  # float32 buffers


def test_weights_that_stopped_being_finite_are_never_saved(tmp_path, monkeypatch):
    """A finite loss, then an update that overflows a weight: the next checkpoint would be no 'last good'."""
    class Overflowing(torch.optim.AdamW):
        steps = 0

        def step(self, closure=None):
            out = super().step(closure)
            Overflowing.steps += 1
            if Overflowing.steps == 6:  # the last of epoch 2 (3 steps each): no forward sees it
                self.param_groups[0]["params"][0].data.fill_(math.inf)
            return out

    monkeypatch.setattr(torch.optim, "AdamW", Overflowing)
    with pytest.raises(T.TrainingDiverged, match=r"no longer finite after step 6: .*last good checkpoint"):
        T.train(tiny_config(tmp_path))
    ckpt = load_state(tmp_path / T.CHECKPOINT_NAME)
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_loss_curve_skips_torn_and_foreign_lines(tmp_path):
    """A torn line (JSONDecodeError), a line that is not an object (AttributeError) or a train record
    without lr (KeyError) ended a finished run with a traceback from its last picture."""
    from maskedssl import viz

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "train", "epoch": 0.5, "step": 1, "loss": 1.0, "lr": 0.1}\n[1, 2]\n'
                       '{"kind": "train", "epoch": 1.0, "step": 2, "loss": 0.5}\n{"kind": "tr')
    assert viz.loss_curve(metrics, tmp_path / "loss.png").stat().st_size > 0
