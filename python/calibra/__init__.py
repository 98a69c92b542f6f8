"""calibra: calibration-driven compression for large language models.

Public surface (kept small on purpose): :mod:`calibra.ops` (kernel-level ops with native CPU/CUDA
implementations and pure-torch references), :func:`calibrate` (one calibration pass -> statistics),
:func:`quantize` (RTNConfig / GPTQConfig / MRGPTQConfig -> quantized model + report), :func:`evaluate`
(perplexity, KL divergence, per-layer attribution), :func:`export` (a QuantizedModel in engine formats)
and :func:`build_info`.
"""
__version__ = "0.1.0"

from calibra._native import build_info  # noqa: E402
from calibra import ops  # noqa: E402

__all__ = ["__version__", "build_info", "ops", "calibrate", "quantize", "evaluate", "export", "RTNConfig",
           "GPTQConfig", "MRGPTQConfig"]

# The verbs import transformers; `import calibra` stays free of it and loads them on first use.
_LAZY = {
    "calibrate": ("calibra.api", "calibrate"),
    "quantize": ("calibra.api", "quantize"),
    "evaluate": ("calibra.eval", "evaluate"),
    "RTNConfig": ("calibra.quant.config", "RTNConfig"),
    "GPTQConfig": ("calibra.quant.config", "GPTQConfig"),
    "MRGPTQConfig": ("calibra.quant.config", "MRGPTQConfig"),
}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name == "export":  # the subpackage, callable as calibra.export(qmodel, path, format=...)
        return importlib.import_module("calibra.export")
    raise AttributeError(f"module 'calibra' has no attribute {name!r}")
