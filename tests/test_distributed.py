"""Two processes on the CPU with gloo, launched as GPUs are: torchrun (torch.distributed.run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

TINY_FLAGS = ["--img-size", "16", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
              "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "2"]


def test_two_process_gloo_run(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "maskedssl", "pretrain", "--method", "imae", "--data", "synthetic:128", "--batch-size", "16",
           "--epochs", "2", "--device", "cpu", "--out", str(out), "--log-every", "1", "--no-tensorboard",
           "--no-progress", "--no-pictures", *TINY_FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=170, check=False)
    assert result.returncode == 0, result.stderr[-3000:]

    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    # 128 images = 4 global batches of 2 x 16 per epoch
    assert (ckpt["epoch"], ckpt["step"]) == (2, 8)
    # every process's random streams are saved, so a resume on two processes continues exactly
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    # rank 0 alone logs: one record per step, not one per process
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9))
    assert result.stdout.count('"status": "done"') == 1
