"""The CUDA extension built by setup.py loads (on CPU too) and registers its schemas."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from maskedssl.ops import cuda_extension_loaded

BUILT = importlib.util.find_spec("maskedssl._C") is not None
pytestmark = pytest.mark.skipif(
    not BUILT, reason="maskedssl._C not built (no nvcc or MASKEDSSL_BUILD_CUDA=0): `make build` builds it"
    if shutil.which("nvcc") is None else "maskedssl._C not built yet: run `make build`")


def test_extension_loads():
    assert cuda_extension_loaded()


def test_every_cuda_schema_is_registered_with_a_cuda_kernel():
    cuda_extension_loaded()
    names = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith("maskedssl::") and n.endswith("_cuda"))
    # one or more kernels per op family: token gather/scatter, mix_patchify, ncut
    for family in ("gather_tokens", "scatter_tokens", "mix_patchify", "ncut"):
        assert any(n.startswith(family) for n in names), f"no {family}*_cuda schema among {names}"
    for name in names:
        op = getattr(torch.ops.maskedssl, name).default
        assert op._schema.name == f"maskedssl::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA"), name
