"""Throughput regression tests (``make bench`` = ``pytest -m benchmark --benchmark-enable``).

Each case is timed with the pytest-benchmark fixture and judged against ``benchmarks/baselines/<device>.json``
(``benchmarks/baselines/__init__.py``: fail above 1.3x the baseline median, ``MASKEDSSL_BENCH_THRESHOLD``
to change it, ``MASKEDSSL_BENCH_WRITE_BASELINE=1`` to store a measurement as the baseline). A case with no
baseline on this device passes with a warning that says what was measured.

On a GPU: every op at the KERNELS.md headline shape on every backend available, forward and forward +
backward where the op has one, and the training step of each method at ViT-B/16. Without a GPU: the
torch backend only, at small shapes (CPU timings are only compared against a CPU baseline, which is never
committed). Without ``--benchmark-enable`` each case runs once as a smoke test and is then skipped.

The unmarked tests at the end check the harness itself (floors, FLOP count, baseline verdicts, result files,
the reference models' parity with ours) and run with the ordinary suite.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import pytest
import torch

# benchmarks/ is a folder of the repository, not of the installed package: make it importable under a
# plain `pytest` too (`python -m pytest` from the root already has it on the path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import baselines  # noqa: E402
from benchmarks.common import device_slug, time_ms  # noqa: E402
from maskedssl.ops import (  # noqa: E402
    available_backends, gather_tokens, mix_patchify, ncut_bipartition, random_masking, scatter_tokens)

bench = pytest.mark.benchmark

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRET_TRITON = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Without a GPU only the torch backend is measured (Triton's interpreter times nothing worth comparing).
BACKENDS = [b for b in ("torch", "triton", "cuda") if ON_GPU and b in available_backends("cuda")] or ["torch"]
# One round lasts about this long (the op is repeated inside it), so short ops are not timed by the clock's
# resolution or a single launch; ROUNDS rounds give the median.
ROUND_S = 0.02 if ON_GPU else 0.05
ROUNDS = 15 if ON_GPU else 7

if ON_GPU:  # KERNELS.md headline: ViT-B/16, 224 px, batch 256, mask 0.75, bf16
    B, IMG, P, D, DD, DTYPE, NCUT_D = 256, 224, 16, 768, 512, torch.bfloat16, 768
    TRAIN = {"preset": "vit_base", "batch": 64, "autocast": torch.bfloat16}
else:
    B, IMG, P, D, DD, DTYPE, NCUT_D = 16, 32, 4, 192, 128, torch.float32, 64
    TRAIN = {"preset": "micro", "batch": 8, "autocast": None}
L = (IMG // P) ** 2
DTYPE_NAME = str(DTYPE).removeprefix("torch.")


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """On CPU, time with one thread: a parallel region waits for its slowest thread, so on a shared machine
    one descheduled thread multiplies the time; a single thread's timings stay comparable."""
    threads = torch.get_num_threads()
    if not ON_GPU:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Timed:
    """Repeat ``fn`` ``inner`` times per round, synchronising the GPU at the end of each round."""

    def __init__(self, fn):
        self.fn = fn
        self.fn()  # warm up: compile / autotune / allocate before calibrating
        once = math.inf
        for _ in range(3):  # the fastest of three, so one preempted call does not set the count
            sync()
            start = time.perf_counter()
            self.fn()
            sync()
            once = min(once, time.perf_counter() - start)
        self.inner = max(1, min(1000, math.ceil(ROUND_S / max(once, 1e-7))))

    def __call__(self):
        for _ in range(self.inner):
            self.fn()
        sync()


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def run_case(benchmark, case: str, fn) -> None:
    """Time ``fn`` and judge it against the baseline.

    The fixture times back-to-back eager calls (one sync per round): the throughput a user's loop sees,
    dispatch overhead included. A short kernel can hide behind that overhead, so on a GPU its device time
    (``triton.testing.do_bench`` median) is judged too, as the case ``<case>/device``.
    """
    timed = Timed(fn)
    benchmark.extra_info.update(case=case, inner=timed.inner, device=DEVICE)
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if not benchmark.enabled:
        pytest.skip("timing disabled: run with --benchmark-enable (make bench)")
    measured = {case: benchmark.stats.stats.median / timed.inner * 1e3}
    if ON_GPU:
        measured[f"{case}/device"] = time_ms(fn)
    failures, missing = [], []
    for name, ms in measured.items():
        verdict = baselines.judge(device_slug(), name, ms, {"inner": timed.inner, "rounds": ROUNDS})
        benchmark.extra_info[name] = {"ms": ms, "verdict": verdict.status}
        print(verdict.message)
        if verdict.status == "regressed":
            failures.append(verdict.message)
        elif verdict.status == "missing":
            missing.append(verdict.message)
    if failures:
        pytest.fail("throughput regression: " + "; ".join(failures))
    if missing:  # measured and printed, but nothing to compare with: not a pass
        pytest.skip("no baseline: " + "; ".join(missing))


def masks(length: int):
    ids_keep, ids_restore, _ = random_masking(B, length, 0.75, device=DEVICE)
    ids_masked = torch.argsort(ids_restore, dim=1)[:, ids_keep.shape[1]:]
    return ids_keep, ids_restore, ids_masked


def backward_of(forward, inputs):
    """``forward`` then the gradient of its output for ``inputs``; the upstream gradient is made once,
    outside the timed call."""
    upstream = torch.ones_like(forward())
    return lambda: torch.autograd.grad(forward(), inputs, upstream)


@bench
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_gather_tokens(benchmark, backend, mode):
    ids_keep, _, _ = masks(L)
    x = torch.randn(B, L, D, device=DEVICE, dtype=DTYPE, requires_grad=mode == "fwd_bwd")
    pos = torch.randn(L, D, device=DEVICE, dtype=DTYPE)  # MAE's sin-cos table is frozen
    if mode == "fwd":
        fn = lambda: gather_tokens(x, ids_keep, pos, backend=backend, check_indices=False)  # noqa: E731
    else:
        fn = backward_of(lambda: gather_tokens(x, ids_keep, pos, backend=backend, check_indices=False), (x,))
    shape = f"B{B}-L{L}-K{ids_keep.shape[1]}-D{D}-{DTYPE_NAME}"
    run_case(benchmark, f"gather_tokens/{mode}/{backend}/{shape}", fn)


@bench
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_scatter_tokens(benchmark, backend, mode):
    ids_keep, ids_restore, _ = masks(L)
    grad = mode == "fwd_bwd"
    x_vis = torch.randn(B, ids_keep.shape[1], DD, device=DEVICE, dtype=DTYPE, requires_grad=grad)
    token = torch.randn(DD, device=DEVICE, dtype=DTYPE, requires_grad=grad)
    pos = torch.randn(L, DD, device=DEVICE, dtype=DTYPE)
    if mode == "fwd":
        fn = lambda: scatter_tokens(x_vis, ids_restore, token, pos, backend=backend,  # noqa: E731
                                    check_indices=False)
    else:
        fn = backward_of(lambda: scatter_tokens(x_vis, ids_restore, token, pos, backend=backend,
                                                check_indices=False), (x_vis, token))
    shape = f"B{B}-L{L}-K{ids_keep.shape[1]}-D{DD}-{DTYPE_NAME}"
    run_case(benchmark, f"scatter_tokens/{mode}/{backend}/{shape}", fn)


@bench
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mixing", [False, True], ids=["mae", "imae"])
def test_mix_patchify(benchmark, backend, mixing):
    ids_keep, _, ids_masked = masks(L)
    imgs = torch.randn(B, 3, IMG, IMG, device=DEVICE)
    mix = {"partner": torch.randperm(B, device=DEVICE), "lam": torch.rand(B, device=DEVICE)} if mixing else {}
    kwargs = dict(ids_keep=ids_keep, ids_masked=ids_masked, out_dtype=DTYPE, backend=backend,
                  check_indices=False, **mix)
    fn = lambda: mix_patchify(imgs, P, **kwargs)  # noqa: E731
    name = "imae" if mixing else "mae"
    run_case(benchmark, f"mix_patchify/{name}/{backend}/B{B}-{IMG}px-p{P}-{DTYPE_NAME}", fn)


@bench
@pytest.mark.parametrize("backend", BACKENDS)
def test_ncut_bipartition(benchmark, backend):
    feats = torch.randn(B, L, NCUT_D, device=DEVICE, dtype=DTYPE)
    run_case(benchmark, f"ncut_bipartition/{backend}/B{B}-N{L}-D{NCUT_D}-{DTYPE_NAME}",
             lambda: ncut_bipartition(feats, backend=backend))


@bench
@pytest.mark.parametrize("method", ["mae", "imae", "sgmae"])
def test_train_step(benchmark, method):
    models = pytest.importorskip("maskedssl.models", reason="maskedssl.models is not available")
    if not hasattr(models, "build_model"):
        pytest.skip("maskedssl.models.build_model is not available yet")
    if TRAIN["preset"] not in models.PRESETS:
        pytest.skip(f"preset {TRAIN['preset']!r} not in maskedssl.models.PRESETS")
    from benchmarks.bench_train import make_step

    train = make_step(method, TRAIN["preset"], "ours", TRAIN["batch"], device=DEVICE,
                      autocast_dtype=TRAIN["autocast"])
    run_case(benchmark, f"train_step/{method}/ours/{TRAIN['preset']}-B{TRAIN['batch']}", train.step)


# ----------------------------------------------------------------------------- the harness itself
PEAKS = {"copy_gbps": 2000.0, "matmul_tflops": 500.0}


def test_make_row_floor_is_the_slower_ceiling():
    from benchmarks.common import make_row

    row = make_row("op", {"B": 2}, "triton", 0.5, bytes_moved=10**9, flops=10**11, peaks=PEAKS)
    assert row["floor_ms"] == pytest.approx(0.5)  # 1 GB at 2 TB/s; the 0.2 ms of FLOPs hide under it
    assert row["pct_of_floor"] == pytest.approx(100.0)
    assert row["gbps"] == pytest.approx(2000.0) and row["pct_of_bandwidth"] == pytest.approx(100.0)
    compute_bound = make_row("op", {}, "x", 2.0, bytes_moved=0, flops=5 * 10**11, peaks=PEAKS)
    assert compute_bound["floor_ms"] == pytest.approx(1.0)
    assert compute_bound["pct_of_floor"] == pytest.approx(50.0)
    assert compute_bound["tflops"] == pytest.approx(250.0) and compute_bound["gbps"] == 0.0


def test_speedups_compare_impls_of_the_same_case():
    from benchmarks.common import add_speedups, make_row

    rows = [make_row("op", {"B": b}, impl, ms, 1, 0, PEAKS)
            for b in (1, 2) for impl, ms in (("reference", 3.0 * b), ("compile", 2.0 * b), ("triton", 1.0))]
    add_speedups(rows)
    triton_b2 = rows[-1]
    assert triton_b2["speedup_vs_reference"] == pytest.approx(6.0)
    assert triton_b2["speedup_vs_compile"] == pytest.approx(4.0)
    assert "speedup_vs_reference" not in rows[0]


def test_baseline_verdicts(tmp_path, monkeypatch):
    monkeypatch.setenv(baselines.DIR_ENV, str(tmp_path))
    monkeypatch.delenv(baselines.THRESHOLD_ENV, raising=False)
    monkeypatch.setenv(baselines.WRITE_ENV, "1")
    assert baselines.judge("dev", "case", 2.0).status == "written"
    monkeypatch.setenv(baselines.WRITE_ENV, "0")
    assert baselines.judge("dev", "case", 2.5).status == "ok"  # 1.25x < 1.3x
    assert baselines.judge("dev", "case", 2.7).status == "regressed"
    assert baselines.judge("dev", "other", 1.0).status == "missing"
    assert baselines.judge("other-dev", "case", 9.0).status == "missing"
    monkeypatch.setenv(baselines.THRESHOLD_ENV, "1.5")
    assert baselines.judge("dev", "case", 2.7).status == "ok"
    monkeypatch.setenv(baselines.THRESHOLD_ENV, "0.9")
    with pytest.raises(ValueError, match=baselines.THRESHOLD_ENV):
        baselines.judge("dev", "case", 2.7)


def test_write_results(tmp_path, monkeypatch):
    import json

    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    rows = [common.make_row("op", {"B": 2}, "triton", 1.0, 10**9, 0, PEAKS)]
    path = common.write_results("smoke", rows, PEAKS, extra={"quick": True})
    data = json.loads(path.read_text())
    assert path.name == f"smoke-{common.device_slug()}.json" and path.with_suffix(".png").stat().st_size > 0
    assert data["peaks"] == PEAKS and data["rows"] == rows and data["extra"] == {"quick": True}
    assert {"device", "torch", "triton", "commit", "date"} <= set(data["device_info"])
    assert "triton" in common.format_table(rows, PEAKS)
    # NaN is not JSON: a row with one (a failed case) used to write a file strict parsers refuse
    rows[0]["extra"] = {"max_abs_err": math.nan}
    data = json.loads(common.write_results("smoke", rows, PEAKS).read_text(), parse_constant=pytest.fail)
    assert data["rows"][0]["extra"]["max_abs_err"] is None
    # a tree without .git takes its commit from MASKEDSSL_COMMIT, and cannot say whether it is dirty
    monkeypatch.setattr(common, "_git", lambda *args: None)
    monkeypatch.setenv("MASKEDSSL_COMMIT", "abc123")
    info = common.device_info()
    assert info["commit"] == "abc123" and info["dirty"] is None


def test_step_flops_count():
    from benchmarks.bench_train import encoder_flops, step_flops
    from benchmarks.reference import ReferenceConfig

    vit_b = ReferenceConfig()
    # ViT-B/16 on 196 patches: the published 17.6 GMACs
    assert encoder_flops(vit_b, 196) / 2 == pytest.approx(17.58e9, rel=0.01)
    mae = step_flops("mae", vit_b, 1)
    assert step_flops("mae", vit_b, 4) == 4 * mae
    assert mae < step_flops("sgmae", vit_b, 1) < step_flops("imae", vit_b, 1) < 2 * mae


@pytest.mark.parametrize("method", ["mae", "imae", "sgmae"])
def test_reference_is_our_model_twin(method):
    """The reference model built from our model's config has the same trainable parameters and trains."""
    models = pytest.importorskip("maskedssl.models")
    if not hasattr(models, "build_model"):
        pytest.skip("maskedssl.models.build_model is not available yet")
    from benchmarks.bench_train import build_ours, loss_of
    from benchmarks.reference import build_reference, config_from_model

    ours = build_ours(method, "micro")
    ref = build_reference(method, config_from_model(ours))

    def trainable(model):
        return sorted(p.numel() for p in model.parameters() if p.requires_grad)

    assert trainable(ref) == trainable(ours)
    imgs = torch.randn(2, 3, ours.img_size, ours.img_size)
    loss = loss_of(ref(imgs, progress=1.0))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_reference_mae_loss_survives_accelerate():
    """The MAE reference and ``maskedssl.accelerate`` of it give the same loss for the same RNG: the
    reference computes MAE as our fused path does (and accelerate() accepts it as an official-style MAE)."""
    maskedssl = pytest.importorskip("maskedssl")
    if not hasattr(maskedssl, "accelerate"):
        pytest.skip("maskedssl.accelerate is not available yet")
    from benchmarks.reference import ReferenceConfig, ReferenceMAE

    cfg = ReferenceConfig(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                          decoder_depth=1, decoder_num_heads=4)
    model = ReferenceMAE(cfg).eval()
    imgs = torch.randn(3, 3, 32, 32)
    torch.manual_seed(1)
    expected = model(imgs, 0.75)[0]
    maskedssl.accelerate(model)
    torch.manual_seed(1)
    torch.testing.assert_close(model(imgs, 0.75)[0], expected, rtol=1e-5, atol=1e-5)


def test_train_benchmark_keeps_what_it_measured_when_time_runs_out(tmp_path, monkeypatch):
    """gpu_session.sh stops a phase with SIGINT at its time limit: the eager runs come first and the
    rows measured before the interrupt are still written."""
    import json

    from benchmarks import bench_train, common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bench_train, "require_cuda", lambda name: None)
    monkeypatch.setattr(bench_train, "measure_peaks", lambda: PEAKS)
    monkeypatch.setattr(bench_train, "release", lambda: None)
    order = []

    def measure(method, preset, impl, batch, peaks, warmup, iters):
        order.append(impl)
        if len(order) == 4:
            raise KeyboardInterrupt
        row = common.make_row("train_step", {"preset": preset, "method": method}, impl, 2.0, 0, 10**12, peaks)
        row["extra"] = {"images_per_s": batch / 2e-3}
        return row

    monkeypatch.setattr(bench_train, "measure", measure)
    bench_train.main(["--quick", "--impl", "ours-compile", "--impl", "ours"])
    assert order == ["ours", "ours", "ours", "ours-compile"]  # every method's eager run before any compile
    data = json.loads(next(tmp_path.glob("train-*.json")).read_text())
    assert len(data["rows"]) == 3 and data["extra"]["interrupted"] is True


@pytest.mark.skipif(ON_GPU or not INTERPRET_TRITON, reason="CPU smoke test with Triton's interpreter")
@pytest.mark.parametrize("broken", [False, True])
def test_op_benchmarks_time_only_results_that_match_the_reference(broken, monkeypatch):
    """bench_token_gather and bench_ncut check each kernel's output on the timed inputs first (the forward
    bit-identical to the official-code path, gradients within bf16 tolerance; the same ncut foreground as
    torch.linalg.eigh on >= 99% of patches) and refuse to time a wrong one. Run on CPU at tiny shapes, with
    the Triton backend once as it is and once made wrong on purpose."""
    from benchmarks import bench_ncut, bench_token_gather

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # no inductor build on a CPU runner
    for module in (bench_token_gather, bench_ncut):
        monkeypatch.setattr(module, "DEVICE", "cpu")
        monkeypatch.setattr(module, "time_ms", lambda fn, warmup=0, rep=0: 1.0)
    monkeypatch.setattr(bench_token_gather, "host_us", lambda fn: 1.0)
    monkeypatch.setattr(bench_token_gather, "LENGTH", 20)
    monkeypatch.setattr(bench_ncut, "tokencut_cpu_ms_per_image", lambda feats: 1.0)
    if broken:
        real_gather, real_ncut = bench_token_gather.gather_tokens, bench_ncut.ncut_bipartition

        def gather_off_by_one_ulp(*args, backend=None):
            out = real_gather(*args, backend=backend)
            return torch.nextafter(out, torch.full_like(out, math.inf)) if backend == "triton" else out

        def ncut_flipped(*args, backend=None):
            cut = real_ncut(*args, backend=backend)
            return cut._replace(foreground=~cut.foreground) if backend == "triton" else cut

        monkeypatch.setattr(bench_token_gather, "gather_tokens", gather_off_by_one_ulp)
        monkeypatch.setattr(bench_ncut, "ncut_bipartition", ncut_flipped)
        with pytest.raises(AssertionError, match="triton differs from the reference path"):
            bench_token_gather.measure_case("gather_tokens", 2, 24, PEAKS, headline=True, quick=True)
        with pytest.raises(AssertionError, match="triton: foreground agrees"):
            bench_ncut.measure_case(2, 24, 16, PEAKS, quick=True)
        return
    rows = bench_token_gather.measure_case("gather_tokens", 2, 24, PEAKS, headline=True, quick=True)
    rows += bench_token_gather.measure_case("scatter_tokens", 2, 24, PEAKS, headline=False, quick=True)
    kernel_rows = [r for r in rows if r["impl"].startswith("triton")]
    assert kernel_rows and all(r["extra"]["max_abs_err"] <= 2e-2 for r in kernel_rows)
    assert all(r["extra"]["bit_identical"] for r in kernel_rows if r["case"]["pass"] == "fwd")
    rows = bench_ncut.measure_case(2, 24, 16, PEAKS, quick=True)
    triton_rows = [r for r in rows if r["impl"] == "triton"]
    assert [r["extra"]["agreement_vs_eigh"] for r in triton_rows] == [1.0]
    # the planted clusters converge at the solver's first convergence test
    products = [(r["extra"]["lanczos_products_mean"], r["extra"]["lanczos_products_max"])
                for r in triton_rows]
    assert products == [(8.0, 8)]
    rows = bench_ncut.measure_partition(2, 24, 16, PEAKS, quick=True)
    kernel_backends = [b for b in ("triton", "cuda") if b in available_backends("cpu")]
    kernel_backends += ["cuda_gram"] if "cuda" in kernel_backends else []
    assert [r["impl"] for r in rows] == ["torch", *kernel_backends]
    assert all(r["extra"]["max_abs_err"] <= 1e-5 for r in rows[1:])
    # 16-bit features with N <= D past the on-chip N (2 N <= D on it): also the step from the cosines, the
    # op's triton path
    for n, d in ((130, 136), (20, 40)):
        rows = bench_ncut.measure_partition(1, n, d, PEAKS, quick=True)
        cos_row = [r for r in rows if r["impl"] == "triton_cos"]
        assert len(cos_row) == 1 and cos_row[0]["extra"]["max_abs_err"] <= 1e-5, (n, d)
