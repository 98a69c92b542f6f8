"""KV-cache compression: per-layer, per-KV-head PCA of values (and pre-RoPE keys), calibrated in the same
pass as the weights, served by a transformers ``Cache`` that stores rank-r coefficients.

* :func:`calibrate` -- model + calibration text -> :class:`KVPreset` (fixed rank, or auto-tuned ranks
  per layer within a perplexity/KL budget); :func:`evaluate` -- measured quality and cache bytes.
* :class:`PCACache` -- ``model.generate(..., past_key_values=PCACache(model, preset))``.
* :class:`KVCompressedLM` -- the model with every forward pass routed through a fresh ``PCACache``
  (what perplexity/KL are measured on).
"""
from calibra.kv.api import DEFAULT_TUNE_TOKENS, calibrate, default_eval_seq_len, evaluate
from calibra.kv.autotune import NoCompressionFits, sensitivity_table
from calibra.kv.basis import TARGETS, HeadBases, bases_from_stats, rank_grid
from calibra.kv.cache import PCACache, PCACacheLayer, remove_rope_capture
from calibra.kv.measure import QualityProbe, measure_bytes
from calibra.kv.model import KVCompressedLM
from calibra.kv.plan import KVArchitectureError, KVPlan, PresetMismatchError
from calibra.kv.preset import KVPreset, PresetError, load_preset

__all__ = ["calibrate", "evaluate", "default_eval_seq_len", "PCACache", "PCACacheLayer", "KVCompressedLM",
           "KVPlan", "KVPreset", "load_preset", "HeadBases", "bases_from_stats", "rank_grid", "measure_bytes",
           "QualityProbe", "sensitivity_table", "remove_rope_capture", "NoCompressionFits", "KVArchitectureError",
           "PresetMismatchError", "PresetError", "TARGETS", "DEFAULT_TUNE_TOKENS"]
