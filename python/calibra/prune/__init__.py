"""calibra.prune: the pruning solver layer -- one weight and its calibration statistics in, the pruned
weight and its mask out.

- :mod:`~calibra.prune.config`: :class:`PruningConfig` (``validate()``, ``requires_calibration()``,
  per-layer checks on shapes alone).
- :mod:`~calibra.prune.patterns`: unstructured, N:M, block -- scores to an exact-count keep-mask.
- :mod:`~calibra.prune.methods`: magnitude and Wanda; :func:`prune_weight` dispatches every method.
- :mod:`~calibra.prune.sparsegpt`: the OBS column sweep (pure torch; the native sweep plugs in per block),
  with joint quantization.
- :mod:`~calibra.prune.schedules`: OneShot, Gradual, Cubic; :mod:`~calibra.prune.callback`: the mask
  callback for training loops; :mod:`~calibra.prune.gradual`: data-only gradual pruning.
- :mod:`~calibra.prune.stages`: the PruningStage state machine behind progress display and the report.
"""
from calibra.prune.callback import MaskCallback
from calibra.prune.config import JointQuant, PruneMethod, PruningConfig
from calibra.prune.methods import magnitude_scores, prune_magnitude, prune_wanda, prune_weight, wanda_scores
from calibra.prune.patterns import NM, Block, Unstructured, parse_pattern
from calibra.prune.gradual import gradual_sparsities, prune_gradually
from calibra.prune.result import LayerStats, PrunedLayer, relative_output_error
from calibra.prune.schedules import Cubic, Gradual, OneShot
from calibra.prune.sparsegpt import sparsegpt_prune, torch_block_sweep
from calibra.prune.stages import PruningStage, StageTracker

__all__ = ["PruningConfig", "PruneMethod", "JointQuant", "Unstructured", "NM", "Block", "parse_pattern",
           "OneShot", "Gradual", "Cubic", "LayerStats", "PrunedLayer", "relative_output_error", "magnitude_scores",
           "wanda_scores", "prune_magnitude", "prune_wanda", "prune_weight", "sparsegpt_prune", "torch_block_sweep",
           "MaskCallback", "prune_gradually", "gradual_sparsities", "PruningStage", "StageTracker"]
