"""The CUDA emulator of tests/cuda_emu, which runs the kernels of csrc/ on CPU tensors in the other tests:
its source rewrites, and its behaviour on small kernels (tests/cuda_emu/selftest.cu) that either compute
something torch can check or break a CUDA rule it must report."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import CUDA_EMULATED
from cuda_emu.build import rewrite_launches, rewrite_source

needs_emulator = pytest.mark.skipif(not CUDA_EMULATED, reason="the CUDA emulator is off (no maskedssl._C)")
ORDERS = ["forward", "reverse", "shuffle"]


def test_launches_become_calls_with_the_kernel_and_its_arguments():
    text = ("k<T, I, VEC><<<grid, dim3(4, 2), shared, stream>>>(\n    a, f(b, c),\n    d);\n"
            "ns::plain<<<1, 32>>>();")
    assert rewrite_launches(text) == (
        '::cpu_emu::launch(::cpu_emu::LaunchConfig(grid, dim3(4, 2), shared, stream), k<T, I, VEC>, '
        '"k<T, I, VEC>", a, f(b, c),\n    d);\n'
        '::cpu_emu::launch(::cpu_emu::LaunchConfig(1, 32), ns::plain, "ns::plain");')


def test_shared_declarations_become_block_statics():
    text = rewrite_source(
        "#include <x.h>\n"
        "__global__ void k() {\n"
        "  extern __shared__ float dyn[];\n"
        "  __shared__ __align__(16) float a[N], b[2][3];\n"
        "}\nTORCH_LIBRARY_IMPL(maskedssl, CUDA, m) {}\n")
    assert "float* const dyn = ::cpu_emu::dynamic_shared<float>();" in text
    assert "alignas(16) static float a[N]; ::cpu_emu::static_shared(&a, sizeof(a));" in text
    assert "alignas(16) static float b[2][3]; ::cpu_emu::static_shared(&b, sizeof(b));" in text
    assert "TORCH_LIBRARY_IMPL(maskedssl, CPU, m)" in text
    assert text.index('#include "cuda_emu_aten.h"') > text.index("#include <x.h>")


@needs_emulator
@pytest.mark.parametrize("width", [1, 2, 8, 32])
def test_shuffles_sum_each_segment(width):
    x = torch.randn(200)
    got = torch.ops.cuda_emu_selftest.segment_sums(x, width)
    padded = torch.cat([x, x.new_zeros(256 - 200)])
    want = padded.view(-1, width).sum(1, keepdim=True).expand(-1, width).reshape(-1)[:200]
    torch.testing.assert_close(got, want)


@needs_emulator
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("block", [32, 96, 1024])
def test_syncthreads_orders_the_block(block, order, monkeypatch):
    monkeypatch.setenv("MASKEDSSL_EMU_SCHEDULE", order)
    x = torch.randn(3 * block)
    got = torch.ops.cuda_emu_selftest.rotate(x, block, True)
    torch.testing.assert_close(got, x.view(3, block).roll(-1, dims=1).reshape(-1))


@needs_emulator
def test_a_race_changes_with_the_thread_order(monkeypatch):
    x = torch.randn(64)
    want = x.roll(-1)
    # thread t reads t + 1's slot before it is written
    monkeypatch.setenv("MASKEDSSL_EMU_SCHEDULE", "forward")
    forward = torch.ops.cuda_emu_selftest.rotate(x, 64, False)
    assert forward[:-1].isnan().all() and forward[-1] == want[-1]
    # thread t + 1 has run first, but 63 reads 0 too early
    monkeypatch.setenv("MASKEDSSL_EMU_SCHEDULE", "reverse")
    reverse = torch.ops.cuda_emu_selftest.rotate(x, 64, False)
    assert reverse[:-1].equal(want[:-1]) and reverse[-1].isnan()


@needs_emulator
def test_a_race_behind_a_shuffle_shows_when_warps_run_ahead(monkeypatch):
    x = torch.randn(256)
    sums = {}
    for order in ("forward", "reverse", "shuffle", "warps", "warps-reverse"):
        monkeypatch.setenv("MASKEDSSL_EMU_SCHEDULE", order)
        two_sums = torch.ops.cuda_emu_selftest.two_sums
        sums[order] = (two_sums(x, False), two_sums(x, True))
    want = sums["forward"][1]
    torch.testing.assert_close(want.view(256, 2), torch.stack([x.sum(), 2 * x.sum()]).expand(256, 2))
    for order, (one_buffer, two_buffers) in sums.items():
        assert two_buffers.equal(want), order
        # the race: hidden while every thread reaches each barrier in turn, shown when a warp runs ahead
        assert one_buffer.equal(want) == (order in ("forward", "reverse", "shuffle")), order


@needs_emulator
@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle", "warps", "warps-reverse"])
def test_lanes_that_returned_stay_finished(order, monkeypatch):
    # half of each warp returns, the other half shuffles under its own mask: waking the warp's shuffle
    # must not restart the returned lanes (their kernel body ran a second time before)
    monkeypatch.setenv("MASKEDSSL_EMU_SCHEDULE", order)
    x = torch.randn(64)
    got = torch.ops.cuda_emu_selftest.half_warp_sums(x)
    halves = x.view(2, 2, 16)
    want = torch.stack([halves[:, 0].sum(1, keepdim=True).expand(2, 16), halves[:, 1]], 1).reshape(-1)
    torch.testing.assert_close(got, want)


def _kernel_runs(case: str) -> list[torch.Tensor]:
    """One call of a csrc/ kernel entry point on fixed inputs (deterministic modes only: float atomics add in
    whatever order the threads come)."""
    g = torch.Generator().manual_seed(0)
    cuda_ops = torch.ops.maskedssl
    if case.startswith("tokens"):
        dtype = torch.bfloat16 if case.endswith("bf16") else torch.float32
        x = torch.randn(3, 50, 40, generator=g).to(dtype)
        pos = torch.randn(50, 40, generator=g).to(dtype)
        ids_keep = torch.rand(3, 50, generator=g).argsort(1)[:, :12]
        ids_restore = torch.rand(3, 50, generator=g).argsort(1).int()
        grad_full = torch.randn(3, 50, 40, generator=g).to(dtype)
        return [cuda_ops.gather_tokens_cuda(x, ids_keep, pos),
                *cuda_ops.gather_tokens_backward_cuda(x[:, :12].contiguous(), ids_keep, 50, True, True),
                cuda_ops.scatter_tokens_cuda(x[:, :12], ids_restore, pos[0], pos),
                *cuda_ops.scatter_tokens_backward_cuda(grad_full, ids_restore, 12, True, True)]
    if case == "partition":
        feats = torch.randn(3, 300, 64, generator=g).to(torch.bfloat16)
        v = torch.randn(3, 300, generator=g)
        wide = torch.randn(3, 300, 320, generator=g).to(torch.bfloat16)
        wide[0, :, :8] = 0
        wide[0, 1::2] = -wide[0, ::2]
        split = v.clone()
        split[0] = torch.where(torch.arange(300) < 100, 1.0, -1.0)  # sample 0's foreground cancels in pairs:
        gram = torch.bmm(wide.float(), wide.float().transpose(1, 2))  # partition_kernel redoes it
        return [*cuda_ops.ncut_partition_cuda(feats, v, 1e-4, 1e-6),
                *cuda_ops.ncut_partition_cuda(feats[..., 1:], v, 1e-4, 1e-6),
                *cuda_ops.ncut_partition_gram_cuda(wide, gram, split, 1e-4, 1e-6)]
    if case.startswith("ncut"):
        n = int(case[4:])
        feats = torch.randn(2, n, 24, generator=g)
        feats[:, : n // 3] += 1.0
        return [*cuda_ops.ncut_fiedler_cuda(feats, None, 1e-5, True),
                *cuda_ops.ncut_fiedler_cuda(feats, 0.2, 1e-5)]
    patch, channels = {"mix_p4": (4, 3), "mix_p16": (16, 3), "mix_p2c1": (2, 1)}[case]
    imgs = torch.randn(3, channels, 8 * patch, 4 * patch, generator=g)
    length = 32
    order = torch.rand(3, length, generator=g).argsort(1)
    partner = torch.tensor([2, 0, 1])
    lam = torch.tensor([0.3, 0.5, 1.0])
    mean, std = torch.rand(channels, generator=g), torch.rand(channels, generator=g) + 0.5
    return list(cuda_ops.mix_patchify_cuda(imgs, patch, partner, lam, order[:, :8], order[:, 8:], True, mean,
                                           std, torch.float32))


@needs_emulator
@pytest.mark.parametrize("case", ["tokens_fp32", "tokens_bf16", "ncut64", "ncut300", "partition", "mix_p4",
                                  "mix_p16", "mix_p2c1"])
def test_csrc_kernels_do_not_depend_on_the_thread_order(case, monkeypatch):
    # A race (a shared-memory or global read not separated from another thread's write by a barrier) gives
    # results that change with the order threads run in; every order is one a GPU may take.
    results = {}
    for order, seed in [("forward", 0), ("reverse", 0), ("shuffle", 1), ("shuffle", 2), ("warps", 0),
                        ("warps-reverse", 0)]:
        monkeypatch.setenv("MASKEDSSL_EMU_SCHEDULE", order)
        monkeypatch.setenv("MASKEDSSL_EMU_SEED", str(seed))
        results[order, seed] = _kernel_runs(case)
    first = results["forward", 0]
    assert all(not t.is_floating_point() or not t.isnan().any() for t in first)
    for key, outputs in results.items():
        for got, want in zip(outputs, first, strict=True):
            assert torch.equal(got, want), \
                f"{case}: outputs under the {key} order differ from the forward order"


@needs_emulator
def test_dynamic_shared_memory_is_per_block():
    x = torch.randn(5 * 64)
    torch.testing.assert_close(torch.ops.cuda_emu_selftest.block_sums(x, 64), x.view(5, 64).sum(1))


@needs_emulator
def test_unwritten_shared_memory_reads_nan():
    out = torch.zeros(32)
    torch.ops.cuda_emu_selftest.misbehave(out, "unwritten_shared")
    assert out.isnan().all()


@needs_emulator
def test_a_larger_dynamic_shared_memory_after_raising_the_limit():
    out = torch.zeros(1)
    torch.ops.cuda_emu_selftest.misbehave(out, "raised_shared")
    assert out.item() == 1.0


@needs_emulator
@pytest.mark.parametrize("kind,message", [
    ("deadlock", "deadlock"),
    ("bad_mask", "leaves it out"),
    ("big_shared", "dynamic shared memory"),
    ("big_grid", "invalid grid"),
    # the emulated build's limit (build.MAX_GRID_Y): batch chunking runs for B >= 4
    ("grid_y_4", "invalid grid"),
    ("big_block", "invalid block"),
])
def test_broken_cuda_rules_raise(kind, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.cuda_emu_selftest.misbehave(torch.zeros(32), kind)


@pytest.mark.skipif(os.environ.get("MASKEDSSL_CUDA_EMULATION") != "asan",
                    reason="only under `make test-asan`")
@pytest.mark.parametrize("call,report", [
    # the gather kernel called directly, past the public op's index check: batch row 1 asks for token 4 of 4,
    # the first float after x's memory
    ("torch.ops.maskedssl.gather_tokens_cuda(torch.randn(2, 4, 8), torch.tensor([[0], [4]]), None)",
     ["AddressSanitizer: heap-buffer-overflow", "gather_rows_kernel"]),
    ("torch.ops.cuda_emu_selftest.misbehave(torch.zeros(8), 'misaligned')",
     ["misaligned address", "requires 16 byte alignment"]),
])
def test_sanitizers_report_what_would_fault_on_a_gpu(call, report):
    # in a subprocess: the sanitizers stop the process at their first report
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", f"import conftest, torch\n{call}\n"], cwd=tests,
                            env=os.environ, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    for line in report:
        assert line in result.stderr
