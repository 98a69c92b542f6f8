"""calibra: calibration-driven compression for large language models.

Public surface (kept small on purpose): :mod:`calibra.ops` (kernel-level ops with native CPU/CUDA
implementations and pure-torch references), :func:`calibrate` (one calibration pass -> statistics),
:func:`evaluate` (perplexity, KL divergence, per-layer attribution) and :func:`build_info`.
"""
__version__ = "0.1.0"

from calibra._native import build_info  # noqa: E402
from calibra import ops  # noqa: E402

__all__ = ["__version__", "build_info", "ops", "calibrate", "evaluate"]

# The verbs import transformers; `import calibra` stays free of it and loads them on first use.
_LAZY = {
    "calibrate": ("calibra.api", "calibrate"),
    "evaluate": ("calibra.eval", "evaluate"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'calibra' has no attribute {name!r}")
