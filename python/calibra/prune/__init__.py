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

The package is callable: ``calibra.prune(model, config, calibration=...)`` is the model-level verb
(:func:`calibra.jobs.prune.prune`). A Python package and a function cannot share the name
``calibra.prune`` (importing the subpackage rebinds the attribute), so the package's module object
forwards calls to the verb. That forward is the one import from here up to the API floor, done
lazily at call time; nothing in this package depends on it.
"""

import sys as _sys
import types as _types

from calibra.prune.callback import MaskCallback
from calibra.prune.config import JointQuant, PruneMethod, PruningConfig
from calibra.prune.gradual import gradual_sparsities, prune_gradually
from calibra.prune.methods import magnitude_scores, prune_magnitude, prune_wanda, prune_weight, wanda_scores
from calibra.prune.patterns import NM, Block, Unstructured, parse_pattern
from calibra.prune.result import LayerStats, PrunedLayer, relative_output_error
from calibra.prune.schedules import Cubic, Gradual, OneShot
from calibra.prune.sparsegpt import sparsegpt_prune, torch_block_sweep
from calibra.prune.stages import PruningStage, StageTracker

__all__ = [
    "PruningConfig",
    "PruneMethod",
    "JointQuant",
    "Unstructured",
    "NM",
    "Block",
    "parse_pattern",
    "OneShot",
    "Gradual",
    "Cubic",
    "LayerStats",
    "PrunedLayer",
    "relative_output_error",
    "magnitude_scores",
    "wanda_scores",
    "prune_magnitude",
    "prune_wanda",
    "prune_weight",
    "sparsegpt_prune",
    "torch_block_sweep",
    "MaskCallback",
    "prune_gradually",
    "gradual_sparsities",
    "PruningStage",
    "StageTracker",
]


class _CallablePackage(_types.ModuleType):
    def __call__(self, model, config, calibration=None, **kwargs):
        """``calibra.prune(model, config, calibration=None, **kwargs)``: see :func:`calibra.jobs.prune.prune`."""
        from calibra.jobs.prune import prune

        return prune(model, config, calibration, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
