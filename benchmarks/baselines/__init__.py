"""Stored throughput baselines, one JSON per device (``<device-slug>.json`` next to this file), and the
rule that turns a new measurement into pass / regressed / missing.

A baseline is only ever written from a real measurement on that device:

    MASKEDSSL_BENCH_WRITE_BASELINE=1 make bench     # measure, then store every case measured

Environment:
- ``MASKEDSSL_BENCH_THRESHOLD`` (default 1.3): a case regresses when its median time exceeds
  threshold x its baseline.
- ``MASKEDSSL_BENCH_WRITE_BASELINE=1``: store the measurements (merged into the device's file, replacing
  the cases measured, keeping the others) instead of comparing against them.
- ``MASKEDSSL_BENCH_BASELINES=DIR``: read and write baselines in DIR instead of this folder (for a scratch
  baseline, e.g. on a CPU machine, without touching the committed ones).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from benchmarks.common import device_info

THRESHOLD_ENV = "MASKEDSSL_BENCH_THRESHOLD"
WRITE_ENV = "MASKEDSSL_BENCH_WRITE_BASELINE"
DIR_ENV = "MASKEDSSL_BENCH_BASELINES"
DEFAULT_THRESHOLD = 1.3


def baseline_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or Path(__file__).resolve().parent)


def threshold() -> float:
    value = float(os.environ.get(THRESHOLD_ENV, DEFAULT_THRESHOLD))
    if value <= 1.0:
        raise ValueError(f"{THRESHOLD_ENV} must be > 1 (a ratio of times), got {value}")
    return value


def writing() -> bool:
    return os.environ.get(WRITE_ENV, "").lower() not in ("", "0", "false", "no")


def path_for(slug: str) -> Path:
    return baseline_dir() / f"{slug}.json"


def load_cases(slug: str) -> dict[str, dict]:
    path = path_for(slug)
    return json.loads(path.read_text())["cases"] if path.exists() else {}


def store(slug: str, case: str, ms: float, meta: dict | None = None) -> Path:
    """Merge one measured case into the device's baseline file (read-modify-write, one case at a time)."""
    path = path_for(slug)
    data = json.loads(path.read_text()) if path.exists() else {"cases": {}}
    info = device_info()
    data["device_info"] = info
    data["cases"][case] = {"ms": ms, "commit": info["commit"], "date": info["date"], **(meta or {})}
    data["cases"] = dict(sorted(data["cases"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


@dataclasses.dataclass
class Verdict:
    status: str  # "ok", "regressed", "missing" (no baseline for this case on this device), "written"
    message: str


def judge(slug: str, case: str, ms: float, meta: dict | None = None) -> Verdict:
    """Compare (or, when writing, store) one measurement of ``case`` on the device ``slug``."""
    if writing():
        path = store(slug, case, ms, meta)
        return Verdict("written", f"{case}: {ms:.4f} ms stored as the baseline in {path}")
    base = load_cases(slug).get(case)
    if base is None:
        return Verdict("missing", f"{case}: {ms:.4f} ms measured; no baseline for it in {path_for(slug)} "
                                  f"(store one with {WRITE_ENV}=1)")
    ratio = ms / base["ms"]
    limit = threshold()
    text = (f"{case}: {ms:.4f} ms vs baseline {base['ms']:.4f} ms ({ratio:.2f}x, limit {limit:.2f}x; "
            f"baseline from commit {(base.get('commit') or '?')[:8]} on {base.get('date', '?')})")
    return Verdict("regressed" if ratio > limit else "ok", text)
