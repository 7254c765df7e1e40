"""Host-side cost of calling an op: the Python/dispatcher boundary that sits on top of every kernel.

The kernels run in tens of microseconds, so a boundary of the same size eats the win. With tiny tensors
the device work is negligible and a loop of calls measures the host path alone: the bare function of the
torch backend, the registered custom op, the public op (validation + dispatch), and the public op with
its data-dependent checks on (one reduction + one device->host sync per call).

    python -m benchmarks.bench_dispatch [--device cuda] [--calls 2000]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import device_info
from maskedssl import ops
from maskedssl.ops.token_gather import _gather_tokens_torch, _scatter_tokens_torch


def _us_per_call(fn, calls: int, device: torch.device) -> float:
    for _ in range(max(calls // 10, 10)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def measure(device: torch.device, calls: int) -> list[tuple[str, str, float]]:
    backend = "cuda" if device.type == "cuda" and "cuda" in ops.available_backends(device) else "torch"
    x = torch.randn(2, 8, 4, device=device)
    ids = torch.tensor([[0, 3], [1, 2]], device=device)
    pos = torch.randn(8, 4, device=device)
    x_vis = torch.randn(2, 2, 4, device=device)
    _, ids_restore, _ = ops.random_masking(2, 8, 0.75, device=device)
    token = torch.randn(4, device=device)
    cases = {
        "gather_tokens": (
            lambda: _gather_tokens_torch(x, ids, pos),
            lambda: torch.ops.maskedssl.gather_tokens(x, ids, pos, backend),
            lambda check: ops.gather_tokens(x, ids, pos, backend=backend, check_indices=check)),
        "scatter_tokens": (
            lambda: _scatter_tokens_torch(x_vis, ids_restore, token, pos),
            lambda: torch.ops.maskedssl.scatter_tokens(x_vis, ids_restore, token, pos, backend),
            lambda check: ops.scatter_tokens(x_vis, ids_restore, token, pos, backend=backend,
                                             check_indices=check)),
    }
    rows = []
    for op, (bare, custom, public) in cases.items():
        rows.append((op, "torch function (no dispatch)", _us_per_call(bare, calls, device)))
        rows.append((op, f"custom op ({backend})", _us_per_call(custom, calls, device)))
        for label, check in (("public op, check_indices=False", False), ("public op, index check on", True)):
            rows.append((op, label, _us_per_call(lambda: public(check), calls, device)))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    info = device_info()
    print(f"host overhead per call on {info.get('device')} ({device.type} tensors), "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores")
    for op, path, us in measure(device, args.calls):
        print(f"{op:15s} {path:32s} {us:8.1f} us")


if __name__ == "__main__":
    main()
