"""The ``maskedssl`` command: flags and config files, one-line errors, pretrain / evaluate / demo."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from maskedssl import cli
from maskedssl import train as T

TINY_FLAGS = ["--img-size", "16", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
              "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2"]
QUIET = ["--no-tensorboard", "--no-progress", "--no-pictures", "--data", "synthetic:64", "--batch-size", "16"]


def parse(*argv) -> T.TrainConfig:
    args = cli.build_parser().parse_args(["pretrain", *argv])
    return cli.config_from_args(args, args.config_keys)


# ---------------------------------------------------------------------------------------------- parsing

def test_every_config_field_and_model_option_is_a_flag():
    cfg = parse("--method", "sgmae", "--model", "micro", "--mask-ratio", "0.6", "--no-norm-pix-loss",
                "--sg-layer", "2", "--hint-ratio", "0.1", "--tau", "0.2", "--warmup-frac", "0.3",
                "--epochs", "7", "--batch-size", "8", "--blr", "1e-3", "--weight-decay", "0.1",
                "--warmup-epochs", "1.5", "--accum-iter", "3", "--compile", "--backend", "torch",
                "--seed", "4", "--num-workers", "0", "--device", "cpu", "--resume", "--img-size", "16")
    assert cfg.method.method == "sgmae"
    assert cfg.method.options == {"mask_ratio": 0.6, "norm_pix_loss": False, "sg_layer": 2, "hint_ratio": 0.1,
                                  "tau": 0.2, "warmup_frac": 0.3, "img_size": 16}
    assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.blr, cfg.optim.accum_iter) == (7, 8, 1e-3, 3)
    assert cfg.run.compile and cfg.run.backend == "torch" and cfg.run.resume == "auto"
    assert cfg.run.device == "cpu" and cfg.data.num_workers == 0
    # i-MAE's options, "none" for optional values
    cfg = parse("--method", "imae", "--lam-mode", "sample", "--distill-sub-weight", "0.5", "--same-prob",
                "0.7", "--teacher", "t.pt", "--pairing", "kmeans", "--clip-grad", "none", "--lr", "2e-4")
    assert cfg.method.options == {"lam_mode": "sample", "distill_sub_weight": 0.5}
    assert cfg.method.teacher == "t.pt" and cfg.data.same_prob == 0.7 and cfg.data.pairing == "kmeans"
    assert cfg.optim.clip_grad is None and cfg.optim.lr == 2e-4
    # the architecture's tuples as one comma-separated value each
    cfg = parse("--mean", "0.5,0.25,0", "--std", "none")
    assert cfg.method.options == {"mean": (0.5, 0.25, 0.0), "std": None}
    # nothing given: the dataclass defaults
    assert parse() == T.TrainConfig()


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_config_file_then_flags(tmp_path, fmt):
    if fmt == "toml" and cli.tomllib is None:
        pytest.skip("TOML needs Python 3.11")
    if fmt == "json":
        path = tmp_path / "c.json"
        path.write_text(json.dumps({"optim": {"epochs": 3, "blr": 5e-4}, "method": {"method": "sgmae",
                                    "options": {"hint_ratio": 0.2}}, "seed": 9, "mask_ratio": 0.5}))
    else:
        path = tmp_path / "c.toml"
        path.write_text('seed = 9\nmask_ratio = 0.5\n[optim]\nepochs = 3\nblr = 5e-4\n'
                        '[method]\nmethod = "sgmae"\n[method.options]\nhint_ratio = 0.2\n')
    cfg = parse("--config", str(path), "--epochs", "5")
    assert cfg.optim.epochs == 5 and cfg.optim.blr == 5e-4  # flag wins, file fills the rest
    assert cfg.method.method == "sgmae" and cfg.method.options == {"hint_ratio": 0.2, "mask_ratio": 0.5}
    assert cfg.run.seed == 9
    # a run's own config.json is a valid config file
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(cfg.to_dict()))
    assert parse("--config", str(saved)) == cfg


def test_config_file_errors(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("epochs = = 3")
    (tmp_path / "unknown.json").write_text('{"optim": {"epoch": 3}}')
    (tmp_path / "list.json").write_text('[1, 2]')  # was an AttributeError traceback
    (tmp_path / "typed.json").write_text('{"optim": {"epochs": "two"}}')  # was a TypeError traceback
    toml_error = "cannot be parsed" if cli.tomllib is not None else "needs Python 3.11"
    # the flag has choices; the file's value reached the first op (a traceback blaming MASKEDSSL_BACKEND)
    (tmp_path / "backend.json").write_text('{"run": {"backend": "foo"}}')
    cases = ((tmp_path / "bad.toml", toml_error), (tmp_path / "unknown.json", "unknown key"),
             (tmp_path / "missing.json", "does not exist"), (tmp_path / "list.json", "table of keys"),
             (tmp_path / "typed.json", "epochs must be an integer"),
             (tmp_path / "backend.json", "backend must be one of auto, torch, triton, cuda, got 'foo'"))
    for path, message in cases:
        assert cli.main(["pretrain", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("maskedssl: error: ") and message in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- errors

def test_bad_dataset_path_is_one_line_from_python_m(tmp_path, capsys, monkeypatch):
    """``python -m maskedssl`` (run in this process: a fresh interpreter costs more than the test)."""
    monkeypatch.setattr(sys, "argv", ["maskedssl", "pretrain", "--data", f"cifar10:{tmp_path / 'nowhere'}"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("maskedssl", run_name="__main__")
    assert exc.value.code == 2
    expected = f"maskedssl: error: cifar10: {tmp_path / 'nowhere'} is not a directory\n"
    assert capsys.readouterr().err == expected


@pytest.mark.parametrize("argv, message", [
    (["--data", "imagefolder:/definitely/not/here"], "imagefolder: /definitely/not/here is not a directory"),
    (["--data", "cifar100:{tmp}"], "lacks train"),
    (["--data", "stl10:/x"], "unknown dataset 'stl10:/x'"),
    (["--method", "mae", "--hint-ratio", "0.1"], "hint_ratio do not apply to method mae"),
    (["--method", "sgmae", "--teacher", "x.pt"], "teacher applies to method imae only"),
    (["--method", "imae", "--teacher", "{tmp}/missing.pt"], "missing.pt does not exist"),
    (["--resume", "{tmp}/nothing.pt"], "nothing.pt does not exist"),
    (["--mask-ratio", "1.5"], "mask_ratio"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--mask-ratio", "0"], "mask_ratio"),  # a NaN loss at step 0 (exit 1) before
    (["--lr", "-1"], "lr must be >= 0"),
    (["--lr", "1e39"], "too large for float32"),  # AdamW's overflow traceback
    (["--min-lr", "1e39"], "min_lr 1e+39 is too large"),  # a NaN loss at the end of the cosine
    (["--log-every", "0"], "log_every must be >= 1"),
    (["--device", "tpu"], "device must be"),
    (["--patch-size", "0"], "patch_size must be positive"),  # ZeroDivisionError
    (["--in-chans", "1"], "in_chans=1"),
    (["--lam-alpha", "nan", "--method", "imae"], "lam_alpha"),
    (["--out", "/proc/no/such/folder"], "cannot create the output folder"),
])
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["pretrain", "--out", str(tmp_path / "o"), *QUIET, *TINY_FLAGS, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maskedssl: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device must be"),  # RuntimeError traceback from torch.device
    (["--max-train", "0"], "--max-train must be >= 1"),  # torch.cat of no features
    (["--ckpt", "{tmp}/config.json"], "cannot be read"),  # torch.load's paragraph-long message
    (["--out", "/proc/no/such/results.json"], "cannot write"),
])
def test_evaluate_user_errors_are_one_line(tmp_path, capsys, argv, message):
    assert cli.main(["pretrain", "--out", str(tmp_path), *QUIET, *TINY_FLAGS, "--max-steps", "1"]) == 0
    capsys.readouterr()
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = cli.main(["evaluate", "--ckpt", str(tmp_path / T.CHECKPOINT_NAME), "--data", "synthetic:20",
                     "--metrics", "knn", "--pool", "mean", "--k", "3", "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("maskedssl: error: ") and message in err and err.count("\n") == 1, err


def test_evaluate_on_an_image_folder(tmp_path, capsys, monkeypatch):
    """The train split's features come from whole images (no random crops: the same images on every load),
    and an unreadable image is one error line naming the file, as in pretrain."""
    from test_train import _noise_folder

    from maskedssl import evaluate as ev

    assert cli.main(["pretrain", "--out", str(tmp_path), *QUIET, *TINY_FLAGS, "--max-steps", "1"]) == 0
    data = _noise_folder(tmp_path / "data" / "train", per_class=4).parent
    _noise_folder(data / "val", per_class=2)
    seen = []
    evaluate_model = ev.evaluate_model
    monkeypatch.setattr(ev, "evaluate_model", lambda m, train, *a, **k: seen.append(train) or
                        evaluate_model(m, train, *a, **k))
    argv = ["evaluate", "--ckpt", str(tmp_path / T.CHECKPOINT_NAME), "--data", f"imagefolder:{data}",
            "--metrics", "knn", "--pool", "mean", "--k", "3", "--device", "cpu"]
    assert cli.main(argv) == 0
    images, labels = ev.load_images(seen[0])
    assert images.shape == (8, 3, 16, 16) and labels.tolist() == [0] * 4 + [1] * 4
    assert torch.equal(ev.load_images(seen[0])[0], images)
    capsys.readouterr()
    (data / "train" / "b" / "broken.png").write_text("not an image")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("maskedssl: error: cannot read image ") and "broken.png" in err
    assert err.count("\n") == 1, err


def test_under_torchrun_a_process_says_its_own_data_error(tmp_path, capsys, monkeypatch):
    """Only process 0 printed errors, so an image that only process 1 read failed without a word (the user
    saw process 0's lost-connection traceback). A config error stays one line, process 0's."""
    from maskedssl.data import DatasetError

    def unreadable(cfg):
        raise DatasetError("cannot read image b/broken.png: cannot identify image file")

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(T, "train", unreadable)
    assert cli.main(["pretrain", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "maskedssl: error (process 1): cannot read image b/broken.png: " \
                                      "cannot identify image file\n"
    monkeypatch.undo()
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["pretrain", "--epochs", "0", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ""


def test_diverging_run_exits_1_with_the_checkpoint_named(tmp_path, capsys):
    # an absurd learning rate: the first update blows the weights up, a later loss is not finite
    code = cli.main(["pretrain", "--out", str(tmp_path), *QUIET, *TINY_FLAGS, "--epochs", "3",
                     "--lr", "1e30"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("maskedssl: error: loss is "), err


# ---------------------------------------------------------------------------------------------- commands

def test_pretrain_then_evaluate(tmp_path, capsys):
    assert cli.main(["pretrain", "--out", str(tmp_path), *QUIET, *TINY_FLAGS, "--epochs", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "done" and Path(summary["checkpoint"]).is_file()
    ckpt = torch.load(summary["checkpoint"], weights_only=True)
    assert ckpt["config"]["method"]["options"]["embed_dim"] == 32
    assert cli.main(["evaluate", "--ckpt", summary["checkpoint"], "--data", "synthetic:64",
                     "--metrics", "knn", "--pool", "mean", "--k", "5"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert 0 <= results["knn_mean"] <= 1


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be >= 1"),  # ran one epoch
    (["--max-epochs", "0"], "--max-epochs must be >= 1"),  # ZeroDivisionError
    (["--budget", "-5"], "--budget must be a positive"),  # ran anyway
    (["--train-size", "32", "--batch-size", "64"], "holds no batch"),  # ZeroDivisionError
    (["--device", "tpu"], "--device must be"),  # RuntimeError traceback
])
def test_demo_user_errors_are_one_line(tmp_path, capsys, argv, message):
    assert cli.main(["demo", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maskedssl: error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["pretrain", "demo"])
def test_bad_backend_variable_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, command):
    # it failed at the first op, after the data and the model were built, with a traceback
    monkeypatch.setenv("MASKEDSSL_BACKEND", "foo")
    argv = [*QUIET, *TINY_FLAGS] if command == "pretrain" else ["--epochs", "1"]
    assert cli.main([command, "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maskedssl: error: MASKEDSSL_BACKEND must be one of") and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())


def test_demo_writes_report_with_numbers_and_pictures(tmp_path):
    out = tmp_path / "demo"
    cli.main(["demo", "--out", str(out), "--epochs", "1", "--train-size", "64", "--batch-size", "32"])
    report = (out / "report.md").read_text()
    assert "| linear probe, mean of patch tokens |" in report and "random init" in report
    for picture in ("reconstruction.png", "masks.png", "loss.png"):
        assert f"]({picture})" in report and (out / picture).is_file()
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["pretrained"]["probe_mean"] <= 1 and "fg_iou" in results["pretrained"]["clustering"]


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("pretrain", "evaluate", "demo"))
