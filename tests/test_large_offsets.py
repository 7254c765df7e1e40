"""Element offsets past 2**31: every kernel must index in 64 bits where a tensor can hold that many elements.

The inputs are allocated with ``torch.empty`` and only the rows an op reads are written: on CPU the rest of
the memory is never touched (the pages are not even mapped in), so these run on a CI machine in seconds.
Only ops whose output stays small are run in the Triton interpreter and the CUDA emulator; the GPU-marked
tests add the backward passes, whose outputs are as large as the inputs.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA, cpu_kernel_backends, gpu_kernel_backends

from maskedssl import ops

BIG = 2**31


def _targets(device: str) -> list:
    cpu = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in cpu_kernel_backends()]
    gpu = [pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu)
           for b in gpu_kernel_backends() or ["triton", "cuda"]]
    return cpu + gpu if device == "any" else gpu


def _require(device: str) -> None:
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("backend,device", _targets("any"))
def test_gather_tokens_reads_rows_past_2_pow_31_elements(backend, device, index_dtype):
    _require(device)
    length, d = 2**21 + 1, 1024  # one sample of 2**31 + 1024 fp16 elements (4 GiB, mostly untouched)
    x = torch.empty(1, length, d, dtype=torch.float16, device=device)
    ids_keep = torch.tensor([[length - 1, 0, length - 2]], device=device, dtype=index_dtype)
    for row in ids_keep[0].tolist():
        x[0, row] = torch.randn(d, device=device).half()
    pos = torch.randn(1, d, device=device).half().expand(length, d)  # stride 0 along L: 2 KiB, not 4 GiB
    got = ops.gather_tokens(x, ids_keep, pos, backend=backend)
    assert torch.equal(got, x[0, ids_keep[0]][None] + pos[0])


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("backend,device", _targets("any"))
def test_mix_patchify_reads_patches_past_2_pow_31_pixels(backend, device, index_dtype):
    _require(device)
    p, side = 16, 46352  # (2, 1, 46352, 46352) uint8: 2**31 + 1023808 pixels per image, 2897 x 2897 patches
    grid = side // p
    imgs = torch.empty(2, 1, side, side, dtype=torch.uint8, device=device)
    corner = imgs[:, :, -2 * p:, -2 * p:]  # the 2 x 2 patches at the highest addresses
    corner.copy_(torch.randint(0, 256, corner.shape, dtype=torch.uint8, device=device))
    last = grid * grid - 1
    ids_keep = torch.tensor([[last, last - 1], [last - grid, last]], device=device, dtype=index_dtype)
    ids_masked = torch.tensor([[last - grid - 1], [last - 1]], device=device, dtype=index_dtype)
    kwargs = dict(partner=torch.tensor([1, 0], device=device, dtype=index_dtype),
                  lam=torch.tensor([0.7, 0.25], device=device), mean=torch.tensor([0.45], device=device),
                  std=torch.tensor([0.22], device=device))
    got_inputs, got_targets = ops.mix_patchify(imgs, p, ids_keep=ids_keep, ids_masked=ids_masked,
                                               backend=backend, **kwargs)

    def in_corner(ids):  # the same patches' rows in the 2 x 2-patch corner image
        return (ids // grid - (grid - 2)) * 2 + ids % grid - (grid - 2)

    want_inputs, want_targets = ops.mix_patchify(corner.contiguous(), p, ids_keep=in_corner(ids_keep.long()),
                                                 ids_masked=in_corner(ids_masked.long()), backend="torch",
                                                 **kwargs)
    torch.testing.assert_close(got_inputs, want_inputs, rtol=1e-6, atol=1e-6)
    for got, want in zip(got_targets, want_targets, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("backend,device", _targets("gpu"))
def test_token_backward_past_2_pow_31_elements(backend, device, index_dtype, length=2**21 + 1):
    _require(device)
    b, k, d = 2, 3, 1024  # 2**31 + 1024 elements per sample: 8 GiB of bf16 per (B, L, D) tensor
    x = torch.zeros(b, length, d, dtype=torch.bfloat16, device=device, requires_grad=True)
    ids_keep = torch.tensor([[length - 1, 0, length - 1], [length - 2, length - 1, 5]], device=device,
                            dtype=index_dtype)
    grad = torch.randn(b, k, d, device=device).bfloat16()
    (grad_x,) = torch.autograd.grad(ops.gather_tokens(x, ids_keep, backend=backend), x, grad)
    assert torch.equal(grad_x[0, length - 1], (grad[0, 0].float() + grad[0, 2].float()).bfloat16())
    assert torch.equal(grad_x[1, length - 2], grad[1, 0]) and torch.equal(grad_x[1, length - 1], grad[1, 1])
    assert torch.count_nonzero(grad_x[:, 6:length - 2]) == 0
    del grad_x, x

    x_vis = torch.randn(b, k, d, dtype=torch.bfloat16, device=device, requires_grad=True)
    mask_token = torch.randn(d, dtype=torch.bfloat16, device=device, requires_grad=True)
    ids_restore = torch.full((b, length), k, dtype=index_dtype, device=device)  # all masked but three rows
    ids_restore[:, -3:] = torch.arange(k, dtype=index_dtype, device=device)
    out = ops.scatter_tokens(x_vis, ids_restore, mask_token, backend=backend)
    assert torch.equal(out[:, -3:], x_vis.detach()) and torch.equal(out[1, 7], mask_token.detach())
    grad_out = torch.zeros_like(out)
    grad_out[:, -3:] = 1
    grad_out[1, length - 4] = 2
    grad_vis, grad_mask = torch.autograd.grad(out, (x_vis, mask_token), grad_out)
    assert torch.equal(grad_vis, torch.ones_like(grad_vis))
    assert torch.equal(grad_mask, torch.full_like(grad_mask, 2))


@pytest.mark.parametrize("backend,device", _targets("gpu"))
def test_ncut_past_2_pow_31_affinity_entries(backend, device):
    _require(device)
    from test_ops_ncut import planted

    b, n = 2049, 1024  # B * N * N = 2**31 + 2**20 entries in the (B, N, N) Gram/affinity workspace
    feats, labels = planted(b, n, 16, 0.3, 0.3, device=device, with_labels=True)
    got = ops.ncut_bipartition(feats, backend=backend)
    alone = ops.ncut_bipartition(feats[-2:].clone(), backend=backend)
    assert torch.equal(got.foreground[-2:], alone.foreground)
    assert (got.fiedler[-2:] * alone.fiedler).sum(-1).abs().min() >= 0.999
    agree = (got.foreground[-2:].cpu() == labels[-2:]).float().mean(-1)
    assert torch.minimum(agree, 1 - agree).max() <= 0.01  # either side may be the foreground
