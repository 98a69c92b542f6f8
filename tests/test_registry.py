"""The op registry itself: trace, reference vs native dispatch, fake tensors, the selftest command."""

import subprocess
import sys

import pytest
import torch

import calibra
from calibra.ops import OPS, trace


def test_trace_records_native_on_cpu():
    x = torch.randn(4, 64)
    with trace() as t:
        calibra.ops.hadamard(x)
    assert t.calls == [("hadamard", "cpu")]


def test_disabled_backend_falls_to_reference_visibly():
    # With the CPU backend disabled, the op still works -- served by the reference, and both the
    # trace and build_info() say so (never a silent fallback).
    code = (
        "import torch, calibra\n"
        "x = torch.randn(4, 64)\n"
        "with calibra.ops.trace() as t: calibra.ops.hadamard(x)\n"
        "print(t.calls)\n"
        "print(calibra.build_info()['backends']['cpu'])\n"
    )
    env = {**__import__("os").environ, "CALIBRA_DISABLE_NATIVE": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "[('hadamard', 'ref')]" in out
    assert "disabled by CALIBRA_DISABLE_NATIVE=cpu" in out


def test_nested_traces_both_record():
    x = torch.randn(2, 32)
    with trace() as outer:
        with trace() as inner:
            calibra.ops.hadamard(x)
    assert inner.calls == outer.calls == [("hadamard", "cpu")]


def test_fake_tensor_shapes_come_from_alloc():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 128)
        y = torch.ops.calibra.hadamard(x, -1)
    assert y.shape == (3, 128) and y.dtype == torch.float32


def test_checks_run_on_fake_tensors_too():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), pytest.raises(ValueError, match=r"\[hadamard\]"):
        torch.ops.calibra.hadamard(torch.empty(3, 100), -1)


def test_every_op_has_example_and_reference():
    for name, op in OPS.items():
        assert op.example is not None, name
        assert callable(op.ref), name


def test_selftest_command_passes():
    out = subprocess.run([sys.executable, "-m", "calibra", "selftest"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in OPS:
        assert f"{name}" in out.stdout


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "calibra", "info"], capture_output=True, text=True, check=True)
    assert "cpu" in out.stdout and "loaded" in out.stdout


def test_cuda_data_error_handlers_raise_the_ops_message():
    # CUDA kernels report bad data through a flag; the handlers that turn the flagged index into the
    # op's ValueError are plain Python and must work without a GPU.

    from calibra.ops._registry import _CUDA_DATA_ERRORS, raise_data_error

    assert {"pack", "quantize_int", "quantize_fp4", "nm_mask", "compress_24", "decompress_24"} <= set(_CUDA_DATA_ERRORS)
    for name in _CUDA_DATA_ERRORS:
        args = OPS[name].example("cpu")
        with pytest.raises(ValueError, match=r"^\[\w+\] "):
            raise_data_error(name, 0, args)
