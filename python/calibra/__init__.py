"""calibra: calibration-driven compression for large language models.

Public surface (kept small on purpose): :mod:`calibra.ops` (kernel-level ops with native CPU/CUDA
implementations and pure-torch references), :func:`calibrate` (one calibration pass -> statistics),
:func:`quantize` (RTNConfig / GPTQConfig / MRGPTQConfig -> quantized model + report),
:func:`evaluate` and :func:`build_info`.
"""
__version__ = "0.1.0"

from calibra._native import build_info  # noqa: E402
from calibra import ops  # noqa: E402

__all__ = ["__version__", "build_info", "ops", "calibrate", "quantize", "evaluate", "RTNConfig", "GPTQConfig",
           "MRGPTQConfig"]


def __getattr__(name):
    # lazy: `import calibra` stays free of transformers; the verbs import it on first use
    if name == "calibrate":
        from calibra.api import calibrate

        return calibrate
    if name == "quantize":
        from calibra.api import quantize

        return quantize
    if name in ("RTNConfig", "GPTQConfig", "MRGPTQConfig"):
        from calibra.quant import config as _qc

        return getattr(_qc, name)
    if name == "evaluate":
        from calibra.eval import evaluate

        return evaluate
    raise AttributeError(f"module 'calibra' has no attribute {name!r}")
