"""Token gather (encoder: keep the visible tokens + position embedding) and scatter (decoder: unshuffle,
fill with the mask token + position embedding), forward and forward + backward.

    python -m benchmarks.bench_token_gather [--quick]

Impls, same inputs (bf16 tokens, int64 indices from ``random_masking``, mask ratio 0.75, L = 196):
- ``reference``: the path as facebookresearch/mae writes it (without the cls token, which both paths leave
  to the model): the encoder adds pos to all L tokens, then gathers with an index repeated to (B, K, D); the
  decoder repeats the mask token, concatenates, gathers with a repeated (B, L, D) index, adds pos.
- ``compile``: ``torch.compile`` of that path (inductor, static shapes);
- ``triton`` and ``cuda``: ``maskedssl.ops.gather_tokens`` / ``scatter_tokens`` with that backend, called
  through the public op (validation, dispatch and autograd included) with index range checks off
  (``MASKEDSSL_CHECK_INDICES=0``: their device->host sync would time the host). The headline rows add
  ``<backend>+check`` with the checks on, and every kernel row carries ``host_us``: the host time of one
  call, which must stay under the device time for the kernel to run back to back.
The backward is timed as in MAE training: pos frozen (no grad_pos), x / x_vis and the mask token trained.
Before timing, each impl's output on the timed inputs is compared with the reference path's (``compare``):
the kernels' forward must be bit-identical, gradients within the bf16 tolerance; a wrong result raises
instead of getting a time, and each row records ``max_abs_err`` and ``bit_identical``.

Bytes (the floor: each input read once, each output written once; e = 2 for bf16, i = 8 for int64):
    gather   forward   (2*B*K*D + L*D)*e + B*K*i      backward  (B*K*D + B*L*D)*e + B*K*i
    scatter  forward   (B*K*D + B*L*D + (L+1)*D)*e + B*L*i
             backward  (B*L*D + B*K*D + D)*e + B*L*i
forward + backward rows count both. Headline (B = 256, encoder D = 768, decoder D = 512): gather forward
~39 MB, scatter forward ~65 MB.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import bench_main, index_checks, make_row, time_ms
from maskedssl.ops import available_backends, gather_tokens, random_masking, scatter_tokens

LENGTH = 196
MASK_RATIO = 0.75
DTYPE = torch.bfloat16
DEVICE = "cuda"
HEADLINE = [("gather_tokens", 256, 768), ("scatter_tokens", 256, 512)]
SWEEP = ([("gather_tokens", b, 768) for b in (64, 128, 512)]
         + [("gather_tokens", 256, d) for d in (384, 1024)]
         + [("scatter_tokens", b, 512) for b in (64, 128, 512)]
         + [("scatter_tokens", 256, d) for d in (256, 768)])


# ----------------------------------------------------------------------------- the official MAE path
def reference_gather(x, ids_keep, pos):
    """models_mae.py: ``x = x + pos_embed[:, 1:]`` on all L tokens, then ``random_masking``'s gather."""
    x = x + pos.unsqueeze(0)
    return torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))


def reference_scatter(x_vis, ids_restore, mask_token, pos):
    """models_mae.py ``forward_decoder``: append mask tokens, unshuffle with a repeated index, add pos."""
    b, k, d = x_vis.shape
    mask_tokens = mask_token.reshape(1, 1, d).repeat(b, ids_restore.shape[1] - k, 1)
    x = torch.cat([x_vis, mask_tokens], dim=1)
    x = torch.gather(x, 1, ids_restore.unsqueeze(-1).repeat(1, 1, d))
    return x + pos.unsqueeze(0)


# ----------------------------------------------------------------------------- byte floors
def floor_bytes(op: str, b: int, d: int, backward: bool) -> int:
    length, k, e, i = LENGTH, _kept(), DTYPE.itemsize, 8
    if op == "gather_tokens":
        forward = (2 * b * k * d + length * d) * e + b * k * i
        grads = (b * k * d + b * length * d) * e + b * k * i
    else:
        forward = (b * k * d + b * length * d + (length + 1) * d) * e + b * length * i
        grads = (b * length * d + b * k * d + d) * e + b * length * i
    return forward + grads if backward else forward


def _kept() -> int:
    return int(LENGTH * (1 - MASK_RATIO))


# ----------------------------------------------------------------------------- cases
def make_inputs(op: str, b: int, d: int, requires_grad: bool):
    """(inputs to the op, trained leaves, gradient of the output)."""
    ids_keep, ids_restore, _ = random_masking(b, LENGTH, MASK_RATIO, device=DEVICE)
    pos = torch.randn(LENGTH, d, device=DEVICE, dtype=DTYPE)
    if op == "gather_tokens":
        x = torch.randn(b, LENGTH, d, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)
        return (x, ids_keep, pos), [x], torch.randn(b, _kept(), d, device=DEVICE, dtype=DTYPE)
    x_vis = torch.randn(b, _kept(), d, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)
    token = torch.randn(1, 1, d, device=DEVICE, dtype=DTYPE, requires_grad=requires_grad)
    grad_out = torch.randn(b, LENGTH, d, device=DEVICE, dtype=DTYPE)
    return (x_vis, ids_restore, token, pos), [x_vis, token], grad_out


def impls(op: str) -> dict:
    reference = reference_gather if op == "gather_tokens" else reference_scatter
    public = gather_tokens if op == "gather_tokens" else scatter_tokens
    torch._dynamo.reset()  # each case compiles afresh instead of hitting the recompile limit
    found = {"reference": reference, "compile": torch.compile(reference, dynamic=False)}
    for backend in ("triton", "cuda"):
        if backend in available_backends(DEVICE):
            found[backend] = lambda *args, _b=backend: public(*args, backend=_b)
    return found


def host_us(fn, calls: int = 200) -> float:
    """Host time per call, the device left to run behind."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    sync()
    return elapsed / calls * 1e6


def timed_step(fn, inputs, leaves, grad_out, backward: bool):
    """The forward, or the forward and the backward to the trained leaves (no .grad accumulation)."""
    if backward:
        return lambda: torch.autograd.grad(fn(*inputs), leaves, grad_out)
    return lambda: fn(*inputs)


def compare(got, want, name: str, case: dict) -> dict:
    """How one impl's output (the forward, or the gradients) compares with the reference path's on the
    timed inputs. The forward must be bit-identical (KERNELS.md); gradients, whose batch sums add in
    another order, within the bf16 tolerance. A wrong result gets no timing: this raises."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    pairs = list(zip(got, want, strict=True))
    err = max(((g.float() - w.float()).abs().max().item() for g, w in pairs), default=0.0)
    identical = all(torch.equal(g, w) for g, w in pairs)
    close = all(torch.allclose(g.float(), w.float(), atol=2e-2, rtol=2e-2) for g, w in pairs)
    forward_kernel = case["pass"] == "fwd" and name in ("triton", "cuda")
    if not close or (forward_kernel and not identical):
        raise AssertionError(f"{name} differs from the reference path at {case}: max abs error {err:g}"
                             f"{'' if close else ' (past the bf16 tolerance)'}")
    return {"max_abs_err": err, "bit_identical": identical}


def measure_case(op: str, b: int, d: int, peaks: dict, headline: bool, quick: bool) -> list[dict]:
    warmup, rep = (10, 30) if quick else (25, 100)
    rows = []
    for backward in (False, True):
        inputs, leaves, grad_out = make_inputs(op, b, d, requires_grad=backward)
        case = {"B": b, "L": LENGTH, "K": _kept(), "D": d, "dtype": str(DTYPE).removeprefix("torch."),
                "pass": "fwd+bwd" if backward else "fwd"}
        bytes_moved = floor_bytes(op, b, d, backward)
        found = impls(op)
        want = timed_step(found["reference"], inputs, leaves, grad_out, backward)()
        for name, fn in found.items():
            step = timed_step(fn, inputs, leaves, grad_out, backward)
            kernel = name in ("triton", "cuda")
            checked = {} if name == "reference" else compare(step(), want, name, case)
            for check in (False, True) if headline and kernel else (False,):
                with index_checks(check):
                    row = make_row(op, case, f"{name}+check" if check else name, time_ms(step, warmup, rep),
                                   bytes_moved, 0, peaks)
                    row["extra"] = dict(checked)
                    if kernel:
                        row["extra"]["host_us"] = round(host_us(step), 1)
                rows.append(row)
    return rows


def run(peaks: dict, quick: bool = False) -> list[dict]:
    rows = []
    for op, b, d in HEADLINE:
        rows += measure_case(op, b, d, peaks, headline=True, quick=quick)
    if not quick:
        for op, b, d in SWEEP:
            rows += measure_case(op, b, d, peaks, headline=False, quick=quick)
    return rows


if __name__ == "__main__":
    bench_main("token_gather", run)
