"""calibra: calibration-driven compression for large language models.

Public surface (kept small on purpose): :mod:`calibra.ops` (kernel-level ops with native CPU/CUDA
implementations and pure-torch references), :func:`calibrate` (one calibration pass -> statistics),
:func:`quantize` (RTNConfig / GPTQConfig / MRGPTQConfig -> quantized model + report), :func:`prune`
(PruningConfig -> pruned model + report), :func:`evaluate` (perplexity, KL divergence, per-layer
attribution), :func:`export` (a QuantizedModel in engine formats) and :func:`build_info`.
"""

__version__ = "0.1.0"

from calibra import ops  # noqa: E402
from calibra._native import build_info  # noqa: E402

__all__ = [
    "__version__",
    "build_info",
    "ops",
    "calibrate",
    "quantize",
    "prune",
    "evaluate",
    "export",
    "RTNConfig",
    "GPTQConfig",
    "MRGPTQConfig",
    "PruningConfig",
    "JointQuant",
]

# The verbs import transformers; `import calibra` stays free of it and loads them on first use.
_LAZY = {
    "calibrate": ("calibra.api", "calibrate"),
    "quantize": ("calibra.api", "quantize"),
    "evaluate": ("calibra.eval", "evaluate"),
    "RTNConfig": ("calibra.quant.config", "RTNConfig"),
    "GPTQConfig": ("calibra.quant.config", "GPTQConfig"),
    "MRGPTQConfig": ("calibra.quant.config", "MRGPTQConfig"),
    "PruningConfig": ("calibra.prune.config", "PruningConfig"),
    "JointQuant": ("calibra.prune.config", "JointQuant"),
}

# Subpackages that are themselves callable verbs: calibra.export(qmodel, path, format=...) and
# calibra.prune(model, config). The name means the same thing whether or not the subpackage was
# imported first.
_CALLABLE_PACKAGES = ("export", "prune")


def __getattr__(name):
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _CALLABLE_PACKAGES:
        return importlib.import_module(f"calibra.{name}")
    raise AttributeError(f"module 'calibra' has no attribute {name!r}")
