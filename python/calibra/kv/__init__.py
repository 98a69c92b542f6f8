"""KV-cache compression: per-layer, per-KV-head PCA of values (and pre-RoPE keys), calibrated in the same
pass as the weights, served by a transformers ``Cache`` that stores rank-r coefficients.

* :func:`calibrate` -- model + calibration text -> :class:`KVPreset` (fixed rank, or auto-tuned ranks
  per layer within a perplexity/KL budget); :func:`evaluate` -- measured quality and cache bytes.
* :class:`PCACache` -- ``KVCompressedLM(model, preset).generate(...)`` builds one per call (or pass
  ``PCACache(model, preset)`` as the cache of ``model.generate`` yourself).
* :class:`KVCompressedLM` -- the model with every forward pass routed through a fresh ``PCACache``
  (what perplexity/KL are measured on).

Names load on first use, so ``calibra kv --help`` does not import transformers.
"""

_LAZY = {
    "calibrate": "calibra.kv.api",
    "evaluate": "calibra.kv.api",
    "default_eval_seq_len": "calibra.kv.api",
    "DEFAULT_TUNE_TOKENS": "calibra.kv.api",
    "NoCompressionFits": "calibra.kv.autotune",
    "sensitivity_table": "calibra.kv.autotune",
    "TARGETS": "calibra.kv.basis",
    "HeadBases": "calibra.kv.basis",
    "bases_from_stats": "calibra.kv.basis",
    "rank_grid": "calibra.kv.basis",
    "PCACache": "calibra.kv.cache",
    "PCACacheLayer": "calibra.kv.cache",
    "remove_rope_capture": "calibra.kv.cache",
    "QualityProbe": "calibra.kv.measure",
    "measure_bytes": "calibra.kv.measure",
    "KVCompressedLM": "calibra.kv.model",
    "KVArchitectureError": "calibra.kv.plan",
    "KVPlan": "calibra.kv.plan",
    "PresetMismatchError": "calibra.kv.plan",
    "KVPreset": "calibra.kv.preset",
    "PresetError": "calibra.kv.preset",
    "load_preset": "calibra.kv.preset",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calibra.kv' has no attribute {name!r}")
