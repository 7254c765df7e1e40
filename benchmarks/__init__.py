"""Benchmarks: per-op (bench_<op>.py, bench_ops.py) and end-to-end training steps (bench_train.py).
Run from the repository root, e.g. ``python -m benchmarks.bench_ops --quick``."""
