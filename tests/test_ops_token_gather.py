"""gather_tokens / scatter_tokens: every kernel backend against the torch backend.

Forward outputs must be bit-identical (pure data movement plus one add rounded as torch rounds); gradients
within the KERNELS.md tolerance table, for unique and repeated indices, in the deterministic and the atomic
mode. Kernel outputs are NaN-poisoned by conftest, so a row a kernel forgets to write fails. On CPU the
kernel backend is Triton under TRITON_INTERPRET=1; the same matrix runs on CUDA (gpu mark) for the Triton
and CUDA backends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import CUDA_EMULATED, DTYPES, INTERPRET, assert_close

from maskedssl import ops
from maskedssl.ops import available_backends, cuda_extension_loaded

# (backend, device): the CPU rows run Triton's interpreter and the CUDA emulator (tests/cuda_emu).
KERNEL_TARGETS = [
    pytest.param("triton", "cpu", id="triton-cpu",
                 marks=pytest.mark.skipif(not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1")),
    pytest.param("cuda", "cpu", id="cuda-emulated",
                 marks=pytest.mark.skipif(not CUDA_EMULATED,
                                          reason="the CUDA emulator is off (no maskedssl._C)")),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.gpu),
]
# (B, L, K, D): odd D, K = L, K = 1, L = 1, B = 1, L = 197 (with cls), a wide D, L = 49 (MAE's K).
FORWARD_SHAPES = [(2, 196, 49, 100), (1, 50, 50, 64), (3, 1, 1, 1), (2, 197, 1, 24), (1, 64, 16, 768),
                  (2, 49, 12, 192)]
# B = 7: past the emulated build's gridDim.y limit of 3 (tests/cuda_emu/build.py), so the CUDA kernels chunk
# the batch
# (130, 3, 2, 4): the Triton backward's deterministic sums over several batch chunks; (2, 150, 100, 8): its
# counting sort over more than one 64-entry block
BACKWARD_SHAPES = [(2, 50, 12, 24), (1, 49, 49, 100), (3, 1, 1, 1), (7, 9, 5, 40), (130, 3, 2, 4),
                   (2, 150, 100, 8)]
INDEX_DTYPES = [torch.int64, torch.int32]


def _require(backend: str, device: str) -> None:
    if backend not in available_backends(device):
        pytest.skip(f"backend {backend!r} cannot run on {device} here")


@contextlib.contextmanager
def _deterministic(enabled: bool):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _ids_keep(b, length, k, device, dtype=torch.int64, repeats=False):
    if repeats:  # any valid index: repeats, and rows nothing points to
        return torch.randint(0, length, (b, k), device=device, dtype=dtype)
    return torch.stack([torch.randperm(length, device=device)[:k] for _ in range(b)]).to(dtype)


def _ids_restore(b, length, device, dtype=torch.int64, permutation=True):
    if permutation:
        return torch.argsort(torch.rand(b, length, device=device), dim=1).to(dtype)
    return torch.randint(0, length, (b, length), device=device, dtype=dtype)


def _both(backend, fn, *args):
    """``fn(*args, backend=...)`` with the kernel backend and with the torch reference."""
    return fn(*args, backend=backend), fn(*args, backend="torch")


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("backend,device", KERNEL_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("shape", FORWARD_SHAPES, ids=str)
def test_forward_bit_identical(backend, device, dtype, index_dtype, shape):
    _require(backend, device)
    b, length, k, d = shape
    x = torch.randn(b, length, d, device=device, dtype=dtype)
    pos = torch.randn(length, d, device=device, dtype=dtype)
    ids_keep = _ids_keep(b, length, k, device, index_dtype)
    got, want = _both(backend, ops.gather_tokens, x, ids_keep, pos)
    torch.testing.assert_close(got, want, atol=0, rtol=0)

    x_vis = torch.randn(b, k, d, device=device, dtype=dtype)
    mask_token = torch.randn(d, device=device, dtype=dtype)
    ids_restore = _ids_restore(b, length, device, index_dtype)
    got, want = _both(backend, ops.scatter_tokens, x_vis, ids_restore, mask_token, pos)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend,device", KERNEL_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_without_pos_and_with_strided_inputs(backend, device, dtype):
    _require(backend, device)
    b, length, k, d = 3, 20, 7, 40
    # rows strided (a transposed (L, B, D) buffer), D strided (copied once), strided index and pos
    views = {
        "x": [torch.randn(length, b, d, device=device, dtype=dtype).transpose(0, 1),
              torch.randn(b, d, length, device=device, dtype=dtype).transpose(1, 2)],
        "pos": [None, torch.randn(length + 1, d, device=device, dtype=dtype)[1:],
                torch.randn(d, length, device=device, dtype=dtype).t()],
    }
    ids_keep = _ids_keep(b, length, 2 * k, device)[:, ::2]
    for x in views["x"]:
        for pos in views["pos"]:
            got, want = _both(backend, ops.gather_tokens, x, ids_keep, pos)
            torch.testing.assert_close(got, want, atol=0, rtol=0)

    x_vis = torch.randn(k, b, d, device=device, dtype=dtype).transpose(0, 1)
    mask_token = torch.randn(1, 1, d, device=device, dtype=dtype)  # MAE's parameter shape
    ids_restore = _ids_restore(b, length, device).t().contiguous().t()
    for pos in views["pos"]:
        got, want = _both(backend, ops.scatter_tokens, x_vis, ids_restore, mask_token, pos)
        torch.testing.assert_close(got, want, atol=0, rtol=0)


# ----------------------------------------------------------------------------- backward
def _gather_grads(x, ids_keep, pos, grad_out, backend):
    x = x.detach().requires_grad_()
    pos = pos.detach().requires_grad_() if pos is not None else None
    ops.gather_tokens(x, ids_keep, pos, backend=backend).backward(grad_out)
    return x.grad, pos.grad if pos is not None else None


def _scatter_grads(x_vis, ids_restore, mask_token, pos, grad_out, backend):
    x_vis = x_vis.detach().requires_grad_()
    mask_token = mask_token.detach().requires_grad_()
    pos = pos.detach().requires_grad_() if pos is not None else None
    ops.scatter_tokens(x_vis, ids_restore, mask_token, pos, backend=backend).backward(grad_out)
    return x_vis.grad, mask_token.grad, pos.grad if pos is not None else None


def _assert_grads_close(got, want, dtype):
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            assert_close(g, w, dtype)


@pytest.mark.parametrize("backend,device", KERNEL_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=str)
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
def test_gather_backward(backend, device, dtype, shape, deterministic):
    _require(backend, device)
    b, length, k, d = shape
    x = torch.randn(b, length, d, device=device, dtype=dtype)
    pos = torch.randn(length, d, device=device, dtype=dtype)
    grad_out = torch.randn(b, k, d, device=device, dtype=dtype)
    with _deterministic(deterministic):
        # MAE's case (a permutation's prefix, frozen pos), then repeats with a pos gradient
        for repeats, p in ((False, None), (True, pos)):
            ids_keep = _ids_keep(b, length, k, device, repeats=repeats)
            got, want = _both(backend, _gather_grads, x, ids_keep, p, grad_out)
            _assert_grads_close(got, want, dtype)


@pytest.mark.parametrize("backend,device", KERNEL_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BACKWARD_SHAPES, ids=str)
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic"])
def test_scatter_backward(backend, device, dtype, shape, deterministic):
    _require(backend, device)
    b, length, k, d = shape
    x_vis = torch.randn(b, k, d, device=device, dtype=dtype)
    mask_token = torch.randn(d, device=device, dtype=dtype)
    pos = torch.randn(length, d, device=device, dtype=dtype)
    grad_out = torch.randn(b, length, d, device=device, dtype=dtype)
    with _deterministic(deterministic):
        for permutation, p in ((True, None), (False, pos)):
            ids_restore = _ids_restore(b, length, device, torch.int32, permutation=permutation)
            got, want = _both(backend, _scatter_grads, x_vis, ids_restore, mask_token, p, grad_out)
            _assert_grads_close(got, want, dtype)


@pytest.mark.parametrize("backend,device", KERNEL_TARGETS)
def test_deterministic_mode_is_bitwise_reproducible(backend, device):
    _require(backend, device)
    b, length, k, d = (64, 49, 40, 96) if device == "cuda" else (4, 20, 12, 16)
    x = torch.randn(b, length, d, device=device, dtype=torch.bfloat16)
    pos = torch.randn(length, d, device=device, dtype=torch.bfloat16)
    ids = _ids_keep(b, length, k, device, repeats=True)
    x_vis = torch.randn(b, k, d, device=device, dtype=torch.bfloat16)
    mask_token = torch.randn(d, device=device, dtype=torch.bfloat16)
    ids_restore = _ids_restore(b, length, device, permutation=False).clamp(max=k + 3)
    with _deterministic(True):
        runs = [(_gather_grads(x, ids, pos, x.new_ones(b, k, d), backend),
                 _scatter_grads(x_vis, ids_restore, mask_token, pos, x.new_ones(b, length, d), backend))
                for _ in range(3)]
    for run in runs[1:]:
        for got, first in zip([*run[0], *run[1]], [*runs[0][0], *runs[0][1]]):
            assert torch.equal(got, first)


@pytest.mark.parametrize("backend,device", KERNEL_TARGETS)
def test_forward_bit_identical_on_bf16_subnormals(backend, device):
    """x + pos where either is a bf16 subnormal (or the smallest normal): the Triton interpreter's own bf16
    -> fp32 cast dropped subnormals, so the kernels widen bf16 with integer ops."""
    _require(backend, device)
    tiny = torch.finfo(torch.bfloat16).tiny
    values = torch.tensor([tiny, tiny / 4, -tiny / 8, tiny / 128, 0.0, -0.0, 1.0], dtype=torch.bfloat16)
    n = len(values)
    x = values.repeat_interleave(n).view(1, n * n, 1).expand(2, -1, 3).contiguous().to(device)
    pos = values.repeat(n).view(n * n, 1).expand(-1, 3).contiguous().to(device)
    ids = torch.arange(n * n, device=device).flip(0).expand(2, -1)
    got, want = _both(backend, ops.gather_tokens, x, ids, pos)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    got, want = _both(backend, ops.scatter_tokens, x[:, :n], ids, x[0, 1], pos)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("backend,device", [("torch", "cpu"), *KERNEL_TARGETS])
def test_double_backward(backend, device):
    """The gradient of each op's gradient (gradient penalties, gradgradcheck): the backward ops are linear
    in the incoming gradient and differentiate through the other direction's forward op."""
    _require(backend, device)
    b, length, k, d = 2, 7, 4, 5
    ids_keep = _ids_keep(b, length, k, device, repeats=True)
    ids_restore = _ids_restore(b, length, device, permutation=False)
    if backend == "torch":  # float64: the reference, checked numerically
        x = torch.randn(b, length, d, dtype=torch.float64, device=device, requires_grad=True)
        pos = torch.randn(length, d, dtype=torch.float64, device=device, requires_grad=True)
        x_vis = torch.randn(b, k, d, dtype=torch.float64, device=device, requires_grad=True)
        token = torch.randn(d, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda a, p: ops.gather_tokens(a, ids_keep, p), (x, pos))
        assert torch.autograd.gradgradcheck(lambda a, t, p: ops.scatter_tokens(a, ids_restore, t, p),
                                            (x_vis, token, pos))
        return

    def penalty_grads(op, inputs, grad_out, backend):
        inputs = [t.detach().requires_grad_() for t in inputs]
        grad_out = grad_out.detach().requires_grad_()
        out = op(*inputs, backend=backend)
        grads = torch.autograd.grad(out, inputs, grad_out, create_graph=True)
        penalty = sum((g * torch.linspace(-1, 1, g.numel(), device=device).view_as(g)).sum() for g in grads)
        return torch.autograd.grad(penalty, grad_out)

    x = torch.randn(b, length, d, device=device)
    pos = torch.randn(length, d, device=device)
    gather = lambda a, p, backend: ops.gather_tokens(a, ids_keep, p, backend=backend)  # noqa: E731
    got, want = _both(backend, penalty_grads, gather, (x, pos), torch.randn(b, k, d, device=device))
    torch.testing.assert_close(got, want)
    scatter = lambda a, t, p, backend: ops.scatter_tokens(a, ids_restore, t, p, backend=backend)  # noqa: E731
    inputs = (torch.randn(b, k, d, device=device), torch.randn(d, device=device), pos)
    got, want = _both(backend, penalty_grads, scatter, inputs, torch.randn(b, length, d, device=device))
    torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_headline_shape_on_gpu(backend):
    """ViT-B/16 at batch 256 in bf16: encoder gather D = 768, decoder scatter D = 512."""
    _require(backend, "cuda")
    b, length, k = 256, 196, 49
    ids_keep, ids_restore, _ = ops.random_masking(b, length, 0.75, device="cuda")
    x = torch.randn(b, length, 768, device="cuda", dtype=torch.bfloat16)
    pos = torch.randn(length, 768, device="cuda", dtype=torch.bfloat16)
    got, want = _both(backend, ops.gather_tokens, x, ids_keep, pos)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    grads = _both(backend, _gather_grads, x, ids_keep, pos, torch.randn_like(got))
    _assert_grads_close(*grads, torch.bfloat16)

    x_vis = torch.randn(b, k, 512, device="cuda", dtype=torch.bfloat16)
    token = torch.randn(512, device="cuda", dtype=torch.bfloat16)
    pos = torch.randn(length, 512, device="cuda", dtype=torch.bfloat16)
    got, want = _both(backend, ops.scatter_tokens, x_vis, ids_restore, token, pos)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    grads = _both(backend, _scatter_grads, x_vis, ids_restore, token, pos, torch.randn_like(got))
    _assert_grads_close(*grads, torch.bfloat16)


# ----------------------------------------------------------------------------- registration
def _op_cases(backend):
    x = torch.randn(2, 6, 5)
    ids_keep = torch.tensor([[1, 4, 4], [0, 5, 2]], dtype=torch.int32)
    _, ids_restore, _ = ops.random_masking(2, 6, 0.5)
    return [
        (torch.ops.maskedssl.gather_tokens.default,
         (x.requires_grad_(), ids_keep, torch.randn(6, 5), backend)),
        (torch.ops.maskedssl.scatter_tokens.default,
         (torch.randn(2, 3, 5, requires_grad=True), ids_restore, torch.randn(5, requires_grad=True),
          torch.randn(6, 5, requires_grad=True), backend)),
        (torch.ops.maskedssl.gather_tokens_backward.default,
         (torch.randn(2, 3, 5), ids_keep, 6, True, True, backend)),
        (torch.ops.maskedssl.gather_tokens_backward.default,
         (torch.randn(2, 3, 5), ids_keep, 6, False, False, backend)),
        (torch.ops.maskedssl.scatter_tokens_backward.default,
         (torch.randn(2, 6, 5), ids_restore, 3, True, True, backend)),
        (torch.ops.maskedssl.scatter_tokens_backward.default,
         (torch.randn(2, 6, 5), ids_restore, 3, False, False, backend)),
    ]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="Triton on CPU needs TRITON_INTERPRET=1"))])
def test_opcheck(backend):
    for op, args in _op_cases(backend):
        torch.library.opcheck(op, args)


def test_gradcheck_float64_with_repeated_indices():
    """float64 runs the torch backend; repeated ids_keep and a non-permutation ids_restore."""
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[1, 4, 4], [0, 5, 0]], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda a, p: ops.gather_tokens(a, ids, p), (x, pos))
    x_vis = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    token = torch.randn(1, 1, 3, dtype=torch.float64, requires_grad=True)
    ids_restore = torch.tensor([[0, 4, 2, 2, 5, 3], [1, 1, 3, 0, 0, 4]])
    assert torch.autograd.gradcheck(lambda a, t, p: ops.scatter_tokens(a, ids_restore, t, p),
                                    (x_vis, token, pos))


def test_compile_fullgraph_forward_and_backward():
    def encode_decode(x, ids_keep, ids_restore, mask_token, pos, decoder_pos):
        visible = ops.gather_tokens(x, ids_keep, pos)
        full = ops.scatter_tokens(visible * 2, ids_restore, mask_token, decoder_pos)
        return full.square().sum()

    b, length, d = 2, 8, 4
    ids_keep, ids_restore, _ = ops.random_masking(b, length, 0.5)
    leaves = [torch.randn(b, length, d), torch.randn(d), torch.randn(length, d), torch.randn(length, d)]
    grads = []
    for fn in (encode_decode, torch.compile(encode_decode, fullgraph=True, backend="aot_eager")):
        x, token, pos, decoder_pos = (t.clone().requires_grad_() for t in leaves)
        fn(x, ids_keep, ids_restore, token, pos, decoder_pos).backward()
        grads.append([x.grad, token.grad, pos.grad, decoder_pos.grad])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want)


def _cpu_backends():
    return ["torch", *(["triton"] if INTERPRET else []), *(["cuda"] if CUDA_EMULATED else [])]


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("backend", _cpu_backends())
def test_compiled_index_checks_assert_on_device(backend, dynamic):
    # torch.compile cannot sync while it traces; the eager range checks were skipped there, and an index
    # past L reached the kernels, which returned whatever memory held (a -1 the torch path took as L - 1)
    torch._dynamo.reset()
    x, pos = torch.randn(2, 6, 4), torch.randn(6, 4)
    x_vis, token = torch.randn(2, 2, 4), torch.randn(4)
    gather = torch.compile(lambda x, ids: ops.gather_tokens(x, ids, pos, backend=backend), fullgraph=True,
                           backend="aot_eager", dynamic=dynamic)
    scatter = torch.compile(lambda x, ids: ops.scatter_tokens(x, ids, token, pos, backend=backend),
                            fullgraph=True, backend="aot_eager", dynamic=dynamic)
    good = torch.tensor([[0, 5], [3, 1]])
    assert torch.equal(gather(x, good), ops.gather_tokens(x, good, pos))
    restore = torch.tensor([[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    assert torch.equal(scatter(x_vis, restore), ops.scatter_tokens(x_vis, restore, token, pos))
    for bad in (6, -1, 100):
        ids = good.clone()
        ids[1, 0] = bad
        with pytest.raises(RuntimeError, match=r"ids_keep must hold indices in \[0, "):
            gather(x, ids)
        ids = restore.clone()
        ids[0, 3] = bad
        with pytest.raises(RuntimeError, match=r"ids_restore must hold indices in \[0, "):
            scatter(x_vis, ids)


def _compiled_graph_code(fn, *args):
    codes = []

    def keep_code(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=keep_code)(*args)
    return "\n".join(codes)


def test_compiled_index_check_off_adds_nothing_to_the_graph(monkeypatch):
    # the models pass check_indices=False for their own masks: a compiled step must carry no assertion
    monkeypatch.delenv("MASKEDSSL_CHECK_INDICES", raising=False)
    x, ids = torch.randn(2, 6, 4), torch.tensor([[0, 5], [3, 1]])
    assert "_assert_async" in _compiled_graph_code(lambda x, i: ops.gather_tokens(x, i), x, ids)
    assert "_assert_async" not in _compiled_graph_code(
        lambda x, i: ops.gather_tokens(x, i, check_indices=False), x, ids)
    monkeypatch.setenv("MASKEDSSL_CHECK_INDICES", "0")
    assert "_assert_async" not in _compiled_graph_code(lambda x, i: ops.gather_tokens(x, i), x, ids)


@pytest.mark.skipif(not cuda_extension_loaded(), reason="maskedssl._C not built (no nvcc, or not built yet)")
def test_cuda_schemas_registered():
    for name in ("gather_tokens_cuda", "scatter_tokens_cuda", "gather_tokens_backward_cuda",
                 "scatter_tokens_backward_cuda"):
        op = getattr(torch.ops.maskedssl, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"), f"{name} has no fake"


_HOPPER_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from maskedssl.kernels import token_gather as kernels

# bf16 data, int64 index; 16-byte-aligned pointers and D / row strides that are multiples of 16 carry the
# divisibility hints the launcher's specialisation would give them (D = 768).
ALIGNED = {"D", "src_stride_b", "src_stride_r", "pos_stride"}
POINTERS = {"src_ptr": "*bf16", "ids_ptr": "*i64", "fill_ptr": "*bf16", "pos_ptr": "*bf16",
            "out_ptr": "*bf16", "grad_ptr": "*bf16", "perm_ptr": "*i32", "starts_ptr": "*i32",
            "mask_part_ptr": "*fp32", "pos_part_ptr": "*fp32"}

def ptx(kernel, **constexprs):
    signature = {n: "constexpr" if n in constexprs else POINTERS.get(n, "i32") for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if n in POINTERS or n in ALIGNED}
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]

forward = ptx(kernels._gather_rows_kernel, HAS_FILL=True, HAS_POS=True, POS_AT_INDEX=False, BLOCK_R=16,
              BLOCK_D=256)
segment = ptx(kernels._segment_sum_kernel, HAS_POS=True, ATOMIC=True, BLOCK_M=16, BLOCK_D=256)
masked = ptx(kernels._masked_sum_kernel, HAS_POS=True, ATOMIC=False, BLOCK_L=16, BLOCK_D=256)
ptx(kernels._invert_index_kernel, BLOCK=64)
for name, code in (("forward", forward), ("segment", segment), ("masked", masked)):
    assert "ld.global.v4" in code or "ld.global.nc.v4" in code, name + ": no 16-byte loads"
assert "st.global.v4" in forward and "st.global.v4" in segment, "no 16-byte stores"
assert "red.global" in segment or "atom.global" in segment, "no atomics in the atomic mode"
"""


def test_triton_kernels_compile_for_hopper_with_16_byte_accesses():
    """The interpreter never compiles: check that the GPU path compiles for sm_90 (no GPU needed) and
    vectorizes. In a subprocess, because TRITON_INTERPRET=1 replaces the kernels with interpreted ones."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


# ----------------------------------------------------------------------------- validation
def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _ids(*shape, value=0, dtype=torch.int64, device="cpu"):
    return torch.full(shape, value, dtype=dtype, device=device)


G, S = ops.gather_tokens, ops.scatter_tokens
# (name, op, args, error, message)
BAD_CALLS = [
    ("gather: x 2-D", G, (_x(2, 5), _ids(2, 1)), ValueError, "x must be 3-D"),
    ("gather: x int", G, (_x(2, 5, 3).int(), _ids(2, 1)), TypeError, "x must"),
    ("gather: ids float", G, (_x(2, 5, 3), _x(2, 1)), TypeError, "ids_keep"),
    ("gather: ids 1-D", G, (_x(2, 5, 3), _ids(2)), ValueError, "ids_keep"),
    ("gather: ids too big", G, (_x(2, 5, 3), _ids(2, 1, value=5)), ValueError, r"\[0, 5\)"),
    ("gather: ids negative", G, (_x(2, 5, 3), _ids(2, 1, value=-1)), ValueError, "ids_keep must hold"),
    ("gather: batch mismatch", G, (_x(2, 5, 3), _ids(3, 1)), ValueError, "ids_keep must have shape"),
    ("gather: pos shape", G, (_x(2, 5, 3), _ids(2, 1), _x(4, 3)), ValueError, "pos must have shape"),
    ("gather: pos dtype", G, (_x(2, 5, 3), _ids(2, 1), _x(5, 3, dtype=torch.float16)), TypeError, "pos must"),
    ("gather: device", G, (_x(2, 5, 3), _ids(2, 1, device="meta")), ValueError, "one device"),
    ("scatter: x_vis 2-D", S, (_x(2, 3), _ids(2, 4), _x(3)), ValueError, "x_vis must be 3-D"),
    ("scatter: ids too big", S, (_x(2, 2, 3), _ids(2, 4, value=4), _x(3)), ValueError, "ids_restore must"),
    ("scatter: batch mismatch", S, (_x(2, 2, 3), _ids(1, 4), _x(3)), ValueError, "ids_restore must have"),
    ("scatter: mask_token size", S, (_x(2, 2, 3), _ids(2, 4), _x(4)), ValueError, "mask_token must hold"),
    ("scatter: mask_token dtype", S, (_x(2, 2, 3), _ids(2, 4), _x(3, dtype=torch.bfloat16)), TypeError,
     "mask_token must"),
    ("scatter: pos shape", S, (_x(2, 2, 3), _ids(2, 4), _x(3), _x(2, 3)), ValueError, "pos must have shape"),
    ("scatter: device", S, (_x(2, 2, 3), _ids(2, 4), _x(3).to("meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_inputs_raise_before_any_kernel(backend, case):
    _, op, args, err, words = case
    with pytest.raises(err, match=words):
        op(*args, backend=backend)

