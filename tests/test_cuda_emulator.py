"""The CUDA emulator of tests/cuda_emu, which runs the kernels of csrc/ on CPU tensors in the other tests:
its source rewrites, and its behaviour on small kernels (tests/cuda_emu/selftest.cu) that either compute
something torch can check or break a CUDA rule it must report."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA_EMULATED
from cuda_emu.build import rewrite_launches, rewrite_source

needs_emulator = pytest.mark.skipif(not CUDA_EMULATED, reason="the CUDA emulator is off (no maskedssl._C)")


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
@pytest.mark.parametrize("block", [32, 96, 1024])
def test_syncthreads_orders_the_block(block):
    x = torch.randn(3 * block)
    got = torch.ops.cuda_emu_selftest.rotate(x, block)
    torch.testing.assert_close(got, x.view(3, block).roll(-1, dims=1).reshape(-1))


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
    ("big_block", "invalid block"),
])
def test_broken_cuda_rules_raise(kind, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.cuda_emu_selftest.misbehave(torch.zeros(32), kind)
