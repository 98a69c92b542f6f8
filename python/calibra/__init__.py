"""calibra: calibration-driven compression for large language models.

Public surface (kept small on purpose): :mod:`calibra.ops` (kernel-level ops with native CPU/CUDA
implementations and pure-torch references), :func:`calibrate` (one calibration pass -> statistics),
:func:`quantize` (RTNConfig / GPTQConfig / MRGPTQConfig -> quantized model + report),
:func:`prune` (PruningConfig -> pruned model + report), :func:`evaluate` and :func:`build_info`.
"""
__version__ = "0.1.0"

from calibra._native import build_info  # noqa: E402
from calibra import ops  # noqa: E402

__all__ = ["__version__", "build_info", "ops", "calibrate", "quantize", "evaluate", "RTNConfig", "GPTQConfig",
           "MRGPTQConfig", "prune", "PruningConfig", "JointQuant"]


def __getattr__(name):
    # lazy: `import calibra` stays free of transformers; the verbs import it on first use
    if name == "calibrate":
        from calibra.api import calibrate

        return calibrate
    if name == "quantize":
        from calibra.api import quantize

        return quantize
    if name == "prune":
        # the package calibra.prune is itself callable (calibra.prune(model, config) runs the verb), so the
        # name means the same thing whether or not the subpackage was imported first
        import calibra.prune as _prune_pkg

        return _prune_pkg
    if name in ("PruningConfig", "JointQuant"):
        from calibra.prune import config as _pc

        return getattr(_pc, name)
    if name in ("RTNConfig", "GPTQConfig", "MRGPTQConfig"):
        from calibra.quant import config as _qc

        return getattr(_qc, name)
    if name == "evaluate":
        from calibra.eval import evaluate

        return evaluate
    raise AttributeError(f"module 'calibra' has no attribute {name!r}")
