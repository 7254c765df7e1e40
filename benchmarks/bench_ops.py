"""Every op benchmark in one run: measure the GPU's copy bandwidth and matmul rate once, run each
``benchmarks/bench_<op>.py`` present (each exposes ``run(peaks, quick) -> rows``), print one table and write
``benchmarks/results/ops-<device>.json`` + ``.png``.

    python -m benchmarks.bench_ops [--quick] [--only token_gather --only ncut]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import add_speedups, format_table, measure_peaks, require_cuda, write_results

# Not per-op modules: this driver and the end-to-end training benchmark.
NOT_OPS = {"ops", "train", "dispatch"}
FIRST = ("token_gather", "mix_patchify", "ncut")


def op_modules() -> list[str]:
    """Names ``<op>`` of the ``bench_<op>.py`` files next to this one, sorted."""
    here = [str(Path(__file__).resolve().parent)]
    names = (m.name for m in pkgutil.iter_modules(here) if m.name.startswith("bench_"))
    found = [n.removeprefix("bench_") for n in names if n.removeprefix("bench_") not in NOT_OPS]
    # the headline op first: a time-boxed GPU session that runs out of time loses the others
    return sorted(found, key=lambda op: (op not in FIRST, FIRST.index(op) if op in FIRST else 0, op))


def main(argv: list[str] | None = None) -> None:
    available = op_modules()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="headline shapes only, fewer repetitions")
    parser.add_argument("--only", action="append", choices=available, metavar="OP",
                        help=f"run only this op's benchmark (repeatable); one of {', '.join(available)}")
    args = parser.parse_args(argv)
    require_cuda("benchmarks.bench_ops")
    peaks = measure_peaks()
    print(f"copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s")
    rows, timings, failed, interrupted = [], {}, {}, False
    try:
        for op in args.only or available:
            start = time.perf_counter()
            try:  # one broken benchmark should not cost the others' numbers in a long GPU session
                rows += importlib.import_module(f"benchmarks.bench_{op}").run(peaks, quick=args.quick)
            except Exception:  # noqa: BLE001
                failed[op] = traceback.format_exc(limit=3)
                print(f"bench_{op} FAILED:\n{failed[op]}")
                continue
            timings[op] = round(time.perf_counter() - start, 1)
            print(f"bench_{op}: done in {timings[op]} s")
    except KeyboardInterrupt:  # a time limit (SIGINT): keep the ops that finished
        interrupted = True
        print(f"interrupted; writing the {len(timings)} op benchmarks that finished")
    add_speedups(rows)
    print(format_table(rows, peaks))
    path = write_results("ops", rows, peaks, extra={"quick": args.quick, "module_seconds": timings,
                                                     "failed": failed, "interrupted": interrupted})
    print(f"wrote {path} and {path.with_suffix('.png')}")
    if failed:
        sys.exit(f"benchmarks that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
