"""The build itself: the CPU backend loads, knows its families, and the package imports no CUDA."""

import subprocess
import sys

import calibra
from calibra.ops import OPS, native_ops


def test_cpu_backend_loaded():
    info = calibra.build_info()
    cpu = info["backends"]["cpu"]
    assert cpu["loaded"], cpu.get("reason")
    assert cpu["threads"] >= 1


def test_every_op_has_a_cpu_kernel():
    missing = set(OPS) - native_ops("cpu")
    assert not missing, f"ops without a CPU kernel: {sorted(missing)}"


def test_build_info_explains_missing_backends():
    info = calibra.build_info()
    for name, entry in info["backends"].items():
        assert entry["loaded"] or entry["reason"], name


def test_native_module_does_not_link_libtorch():
    from calibra import _native

    path = _native.load("cpu").__file__
    out = subprocess.run(["ldd", path], capture_output=True, text=True).stdout
    assert "libtorch" not in out and "libc10" not in out, out


def test_import_does_not_load_cuda_module_without_gpu():
    code = "import calibra, sys; print('calibra._cuda' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    import torch

    if not torch.cuda.is_available():
        assert out.strip() == "False"
