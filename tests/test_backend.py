"""Backend selection: argument, environment variable, auto, fallback with one log line."""

from __future__ import annotations

import logging

import pytest
import torch

from maskedssl import ops
from maskedssl.ops import _backend


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.resolve_backend("op", None, torch.device("cpu")) == "torch"
    assert _backend.resolve_backend("op", "auto", torch.device("cpu")) == "torch"


def test_environment_variable_selects(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "TORCH")
    assert _backend.requested_backend(None) == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="MASKEDSSL_BACKEND must be one of"):
        _backend.requested_backend(None)
    assert _backend.requested_backend("cuda") == "cuda"  # the argument wins over the environment
    monkeypatch.setenv(_backend.ENV_VAR, "")  # set but empty, as `MASKEDSSL_BACKEND= cmd` leaves it: unset
    assert _backend.requested_backend(None) == "auto"


def test_bad_backend_argument():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.requested_backend("numpy")
    with pytest.raises(TypeError, match="backend must be a string"):
        _backend.requested_backend(3)


def test_unavailable_backend_falls_back_once(caplog, monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "cuda_emulated_on_cpu", False)  # the CUDA kernels must be out of reach
    with caplog.at_level(logging.WARNING, logger="maskedssl"):
        for _ in range(3):
            assert _backend.resolve_backend("some_op", "cuda", torch.device("cpu")) == "torch"
    lines = [r for r in caplog.records if "some_op" in r.getMessage()]
    assert len(lines) == 1 and "unavailable" in lines[0].getMessage()


def test_cuda_on_cpu_only_under_the_emulator(monkeypatch):
    monkeypatch.setattr(_backend, "cuda_emulated_on_cpu", False)
    assert "cuda" not in _backend.available_backends("cpu")
    monkeypatch.setattr(_backend, "cuda_emulated_on_cpu", True)
    assert ("cuda" in _backend.available_backends("cpu")) == _backend.cuda_extension_loaded()
    assert "cuda" not in _backend.available_backends("meta")
    # auto never picks an emulator: CPU tensors run the torch backend
    assert _backend.resolve_backend("some_op", "auto", torch.device("cpu")) == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in _backend.available_backends("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ("triton" in _backend.available_backends("cpu")) == _backend.triton_importable()


def test_ops_run_with_environment_backend(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    x = torch.randn(2, 4, 3)
    ids = torch.tensor([[0, 3], [1, 2]])
    assert ops.gather_tokens(x, ids).shape == (2, 2, 3)


def test_refuse_cuda_hands_inputs_the_kernel_cannot_take_to_the_next_backend(caplog):
    cpu = torch.device("cpu")
    assert _backend.refuse_cuda("op", "cuda", cpu, None) == "cuda"  # no reason: keep it
    assert _backend.refuse_cuda("op", "triton", cpu, "too big") == "triton"  # only cuda is refused
    expected = "triton" if "triton" in _backend.available_backends(cpu) else "torch"
    with caplog.at_level("WARNING"):
        assert _backend.refuse_cuda("op", "cuda", cpu, "rows too long for the test") == expected
    assert f"maskedssl.op: rows too long for the test; using {expected!r}" in caplog.text


def test_fallback_first_met_inside_a_compiled_region_traces_and_logs_later(monkeypatch, caplog):
    monkeypatch.setattr(_backend, "_warned", set())  # as in a fresh process: nothing logged yet
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    ids = torch.tensor([[0, 2], [1, 3]])
    compiled = torch.compile(lambda t: ops.gather_tokens(t, ids, backend="triton", check_indices=False),
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), ops.gather_tokens(x, ids, backend="torch"))
    with caplog.at_level("WARNING", logger=_backend.log.name):
        ops.gather_tokens(x, ids, backend="triton")  # the eager call still says it once
    assert "float64" in caplog.text
