"""Loading of the native backends and the tensor hand-off to them.

Set ``CALIBRA_DISABLE_NATIVE=cpu`` (or ``cuda``, ``all``, a comma list) to run every op in its
pure-torch reference instead, e.g. to rule out a kernel when debugging.

The one place that imports ``calibra._cpu`` / ``calibra._cuda`` / ``calibra._metal``. Each backend is
loaded lazily, at most once; when one does not load, the reason is kept and reported by :func:`calibra.build_info`, so
nobody has to guess why an op ran in its reference implementation. A CPU-only user never imports
anything that needs the CUDA runtime.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading

import torch

# Must match calibra::DType in csrc/include/calibra/dtype.h.
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float64: 3,
    torch.uint8: 4,
    torch.int8: 5,
    torch.int16: 6,
    torch.int32: 7,
    torch.int64: 8,
    torch.bool: 9,
    torch.float8_e4m3fn: 10,
}

BACKENDS = ("cpu", "cuda", "mps")

_lock = threading.Lock()
_modules: dict[str, object] = {}
_reasons: dict[str, str] = {}


def tensor_arg(t: torch.Tensor) -> tuple:
    """The (data_ptr, shape, strides, dtype_code) tuple that native code reads as a TensorArg."""
    try:
        code = DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"[native] dtype {t.dtype} cannot be passed to a native kernel") from None
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), code)


def _import_backend(name: str):
    disabled = {b.strip() for b in os.environ.get("CALIBRA_DISABLE_NATIVE", "").split(",")}
    if name in disabled or "all" in disabled:
        raise ImportError(f"disabled by CALIBRA_DISABLE_NATIVE={os.environ['CALIBRA_DISABLE_NATIVE']}")
    if name == "mps":  # Metal kernels are compiled from the shipped source through torch.mps
        from calibra import _metal

        return _metal.load_backend()
    try:
        module = importlib.import_module(f"calibra._{name}")
    except ModuleNotFoundError as e:
        if e.name == f"calibra._{name}":
            how = " (build with CALIBRA_CUDA=1 pip install .)" if name == "cuda" else ""
            raise ImportError(f"calibra._{name} is not built{how}") from None
        raise
    if name == "cpu":
        module.set_num_threads(torch.get_num_threads())
    return module


def load(name: str):
    """The native module of backend ``name`` ("cpu", "cuda", "mps"), or None if it did not load."""
    with _lock:
        if name in _modules:
            return _modules[name]
        if name in _reasons:
            return None
        try:
            module = _import_backend(name)
        except Exception as e:  # record why, never hide it: build_info() reports this
            _reasons[name] = f"{type(e).__name__}: {e}"
            return None
        _modules[name] = module
        return module


def load_failure(name: str) -> str:
    """Why backend ``name`` did not load ("" if it loaded or was never tried)."""
    return _reasons.get(name, "")


def build_info() -> dict:
    """Which native backends loaded, what they contain, and for the others why not."""
    from calibra import __version__

    backends = {}
    for name in BACKENDS:
        if name == "cuda" and not torch.cuda.is_available() and "cuda" not in _modules:
            # Do not import the CUDA module on a machine without a GPU; say whether it was built.
            built = importlib.util.find_spec("calibra._cuda") is not None
            backends[name] = {
                "loaded": False,
                "built": built,
                "reason": "torch sees no CUDA device" + ("" if built else "; calibra._cuda is not built"),
            }
            continue
        module = load(name)
        if module is None:
            reason = _reasons.get(name, "unknown")
            if name == "cuda" and "CALIBRA_DISABLE_NATIVE" not in reason:
                # torch sees a GPU (else the branch above): say what that costs.
                reason += "; torch sees a CUDA device, so every op on CUDA tensors runs in its pure-torch reference"
            backends[name] = {"loaded": False, "reason": reason}
            continue
        info = dict(module.BUILD_INFO)
        entry = {"loaded": True, "path": getattr(module, "__file__", None), **info}
        if name == "cpu":
            entry["threads"] = module.num_threads()
        if name == "cuda" and hasattr(module, "device_count"):
            entry["devices"] = module.device_count()
        backends[name] = entry
    return {"version": __version__, "torch": torch.__version__, "backends": backends}
