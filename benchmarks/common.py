"""What every benchmark shares: the machine's description, its two measured ceilings, timing, result rows
with their byte/FLOP floor, and the JSON + PNG they are written to.

A row's floor is the time the op would take if it only moved the bytes it must move at the measured copy
bandwidth, or only did its FLOPs at the measured bf16 matmul rate, whichever is longer:
``floor_ms = max(bytes / copy_bandwidth, flops / matmul_rate)``. ``pct_of_floor = floor_ms / ms * 100``
(100 means the op runs at the ceiling; for a training step counted by FLOPs this is its MFU).
Both ceilings are measured in the same run as the op, never taken from a data sheet.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Large enough to leave the caches and amortize launch cost on any current GPU, small enough for 16 GB ones.
COPY_BYTES = 1 << 30
MATMUL_SIZE = 8192


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name() -> str:
    """The GPU's name, or ``cpu (<model>)`` without one."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({_cpu_name()})"


def device_slug(name: str | None = None) -> str:
    """A file-name-safe form of the device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    slug = re.sub(r"[^a-z0-9]+", "-", (name or device_name()).lower()).strip("-")
    return slug or "unknown"


def device_info() -> dict:
    """The device, software versions and source commit a measurement belongs to."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    head = _git("rev-parse", "HEAD")
    info = {
        "device": device_name(),
        "device_slug": device_slug(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        # a copy of the tree without .git (a lent GPU machine) is told its commit by MASKEDSSL_COMMIT, and
        # cannot tell whether it differs from it
        "commit": head or os.environ.get("MASKEDSSL_COMMIT") or None,
        "dirty": None if head is None else bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
        info["driver"] = _nvidia_smi("driver_version")
    return info


def _finite(value):
    """``value`` with every NaN / inf float replaced by None: strict JSON parsers refuse NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def require_cuda(what: str) -> None:
    """Exit with a one-line message (no traceback) when there is no GPU to measure on."""
    if not torch.cuda.is_available():
        sys.exit(f"{what} needs a CUDA GPU to measure on; none is visible here "
                 f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}).")


@contextlib.contextmanager
def index_checks(enabled: bool):
    """``MASKEDSSL_CHECK_INDICES`` set for the block: the ops' eager input checks (one device->host sync
    each) on or off. Kernel rows are timed without them, as a training loop building its own indices runs."""
    before = os.environ.get("MASKEDSSL_CHECK_INDICES")
    os.environ["MASKEDSSL_CHECK_INDICES"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MASKEDSSL_CHECK_INDICES")
        else:
            os.environ["MASKEDSSL_CHECK_INDICES"] = before


def time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    """Median time of ``fn()`` in milliseconds.

    On CUDA this is ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, warmup and rep in
    ms). Without a GPU it falls back to a wall-clock median over about ``rep`` ms so the benchmarks can be
    smoke-tested on CPU; those numbers are not comparable with GPU ones.
    """
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    return _wall_clock_median_ms(fn, warmup, rep)


def _wall_clock_median_ms(fn, warmup, rep):
    start = time.perf_counter()
    fn()
    first = (time.perf_counter() - start) * 1e3
    for _ in range(max(0, min(int(warmup / max(first, 1e-3)), 100))):
        fn()
    times = []
    for _ in range(max(3, min(int(rep / max(first, 1e-3)), 1000))):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_peaks() -> dict:
    """The two ceilings of this GPU, measured now: device-to-device copy bandwidth (read + write counted)
    and dense bf16 matmul rate."""
    require_cuda("measure_peaks")
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), warmup=50, rep=200)
    del src, dst
    n = MATMUL_SIZE
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = time_ms(lambda: a @ b, warmup=50, rep=200)
    del a, b
    torch.cuda.empty_cache()
    return {
        "copy_gbps": 2 * COPY_BYTES / (copy_ms * 1e-3) / 1e9,
        "matmul_tflops": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
        "copy_bytes": COPY_BYTES,
        "matmul_shape": [n, n, n],
    }


def make_row(op: str, case: dict, impl: str, ms: float, bytes_moved: int, flops: int, peaks: dict) -> dict:
    """One result: the measured time against the floor set by ``bytes_moved`` and ``flops``.

    ``bytes_moved`` and ``flops`` are the op's hand-counted minimum (each input read once, each output
    written once), the same for every impl of one case, so the percentages compare impls fairly.
    """
    seconds = ms * 1e-3
    bandwidth = peaks["copy_gbps"] * 1e9
    rate = peaks["matmul_tflops"] * 1e12
    floor_ms = max(bytes_moved / bandwidth, flops / rate) * 1e3
    gbps = bytes_moved / seconds / 1e9 if bytes_moved and seconds > 0 else 0.0
    return {
        "op": op,
        "case": dict(case),
        "impl": impl,
        "ms": ms,
        "bytes": int(bytes_moved),
        "flops": int(flops),
        "gbps": gbps,
        "tflops": flops / seconds / 1e12 if flops and seconds > 0 else 0.0,
        "floor_ms": floor_ms,
        "pct_of_floor": floor_ms / ms * 100 if ms > 0 else 0.0,
        "pct_of_bandwidth": gbps / peaks["copy_gbps"] * 100 if bytes_moved else 0.0,
    }


def case_label(case: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in case.items())


def add_speedups(rows: list[dict], baselines: tuple[str, ...] = ("reference", "compile")) -> list[dict]:
    """Add ``speedup_vs_<impl>`` to each row: the named impl's time over this row's time, same op and case.

    Impl names are matched exactly, so a bench that calls its official-code path ``reference`` and the
    ``torch.compile`` of it ``compile`` gets both ratios.
    """
    times = {(r["op"], case_label(r["case"]), r["impl"]): r["ms"] for r in rows}
    for row in rows:
        for base in baselines:
            ref = times.get((row["op"], case_label(row["case"]), base))
            if ref is not None and row["impl"] != base:
                row[f"speedup_vs_{base}"] = ref / row["ms"]
    return rows


def format_table(rows: list[dict], peaks: dict | None = None) -> str:
    """A plain-text table of rows, headed by the device and its measured ceilings."""
    head = f"device: {device_name()}"
    if peaks:
        head += f"   copy {peaks['copy_gbps']:.0f} GB/s   bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s"
    speedup_cols = sorted({k for r in rows for k in r if k.startswith("speedup_vs_")})
    cols = ["op", "case", "impl", "ms", "gbps", "pct_of_bandwidth", "pct_of_floor", *speedup_cols]
    extra = sorted({k for r in rows for k in r.get("extra", {})})
    cols += extra

    def cell(row, col):
        value = row.get("extra", {}).get(col) if col in extra else row.get(col)
        if col == "case":
            return case_label(value)
        if col == "ms":
            return f"{value:.4f}"
        if isinstance(value, float) and col.startswith("speedup"):
            return f"{value:.2f}x"
        if isinstance(value, float) and col not in extra:
            return f"{value:.1f}"
        return "" if value is None else _number(value)

    table = [cols] + [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([head, *lines])


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def markdown_table(path: Path) -> str:
    """A results JSON as a Markdown table for the README, headed by its device, date and commit, so every
    figure copied from it stays traceable to the file: ``python -m benchmarks.common results/*.json``."""
    data = json.loads(Path(path).read_text())
    info, peaks, rows = data["device_info"], data["peaks"], data["rows"]
    speedups = sorted({k for r in rows for k in r if k.startswith("speedup_vs_")})
    extra = sorted({k for r in rows for k in r.get("extra", {})})
    head = ["op", "case", "impl", "median ms", "GB/s", "% of bandwidth", "% of floor", *speedups, *extra]
    lines = [f"{data['name']}: {info['device']}, {info['date'][:10]}, commit {(info['commit'] or '?')[:8]}, "
             f"torch {info['torch']}, triton {info['triton']}; measured copy {peaks['copy_gbps']:.0f} GB/s, "
             f"bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s (`{Path(path).name}`)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["op"], case_label(r["case"]), r["impl"], f"{r['ms']:.4g}", f"{r['gbps']:.0f}",
                 f"{r['pct_of_bandwidth']:.0f}", f"{r['pct_of_floor']:.0f}"]
        cells += [f"{r[k]:.2f}x" if k in r else "" for k in speedups]
        cells += [_number(r.get("extra", {}).get(k, "")) for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], peaks: dict, extra: dict | None = None) -> Path:
    """Write ``benchmarks/results/<name>-<device-slug>.json`` (device, versions, commit, ceilings, rows) and
    a PNG bar plot of each row's % of floor next to it. Returns the JSON path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    info = device_info()
    path = RESULTS_DIR / f"{name}-{info['device_slug']}.json"
    payload = {"name": name, "device_info": info, "peaks": peaks, "rows": rows}
    if extra:
        payload["extra"] = extra
    path.write_text(json.dumps(_finite(payload), indent=1, default=str, allow_nan=False) + "\n")
    _plot(rows, path.with_suffix(".png"), f"{name} on {info['device']} ({(info['commit'] or '?')[:8]})")
    return path


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r["impl"] for r in rows))
    colors = {impl: plt.cm.tab10(i % 10) for i, impl in enumerate(impls)}
    labels = [f"{r['op']} | {case_label(r['case'])} | {r['impl']}" for r in rows]
    values = [r["pct_of_floor"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.22 * max(len(rows), 1)))
    ax.barh(range(len(rows)), values, color=[colors[r["impl"]] for r in rows])
    for i, r in enumerate(rows):
        ax.text(values[i], i, f" {r['ms']:.3g} ms", va="center", fontsize=6)
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.axvline(100, color="black", lw=0.8, ls="--")
    ax.set_xlabel("% of floor  (floor = max(bytes / copy bandwidth, FLOPs / matmul rate); 100 = ceiling)")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i]) for i in impls]
    ax.legend(handles, impls, fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def bench_main(name: str, run: Callable[..., list[dict]], argv: list[str] | None = None) -> Path:
    """The ``__main__`` of a ``bench_<op>.py``: measure the ceilings, run, print the table, write results."""
    parser = argparse.ArgumentParser(description=f"benchmark: {name}")
    parser.add_argument("--quick", action="store_true", help="only the headline shape, fewer repetitions")
    args = parser.parse_args(argv)
    require_cuda(f"benchmarks {name}")
    peaks = measure_peaks()
    rows = add_speedups(run(peaks, quick=args.quick))
    print(format_table(rows, peaks))
    path = write_results(name, rows, peaks, extra={"quick": args.quick})
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return path


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(markdown_table(Path(arg)), end="\n\n")
