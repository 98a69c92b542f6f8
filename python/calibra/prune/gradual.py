"""Data-only gradual pruning: reach the target in ``k`` steps with no training, recalibrating the
statistics between steps.

One-shot solvers see the calibration statistics of the dense model. Pruning in ``k`` smaller steps and
recomputing the statistics from the partially pruned model in between lets later steps see the
activations the sparse model actually produces (the runner recalibrates everything upstream of the
layer), and for SparseGPT lets each step's error compensation start from the previous step's weights.

Step ``j`` (1..k) prunes to ``gradual_sparsities(target, k)[j - 1]`` (Zhu & Gupta's cubic shape over the
steps, so the early steps, where redundancy is highest, remove the most), starting from the previous
step's weight and keeping everything already pruned pruned (nested masks).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from calibra.prune.checks import check_layer
from calibra.prune.config import PruningConfig
from calibra.prune.methods import prune_weight
from calibra.prune.result import LayerStats, PrunedLayer, relative_output_error

Recalibrate = Callable[[int, torch.Tensor], LayerStats]


def gradual_sparsities(target: float, k: int) -> list[float]:
    """Per-step sparsities: ``s_j = target * (1 - (1 - j / k)^3)``, ``j = 1..k`` (the last is the target)."""
    return [target * (1.0 - (1.0 - j / k) ** 3) for j in range(1, k + 1)]


def prune_gradually(
    w: torch.Tensor, config: PruningConfig, recalibrate: Recalibrate, *, steps: int | None = None, name: str = "weight"
) -> PrunedLayer:
    """Prune ``w [out, in]`` (not modified) in ``steps`` (default ``config.gradual_steps``) steps.

    ``recalibrate(step, current_weight) -> LayerStats`` is called before every step (``step`` 0-based,
    ``current_weight`` the weight after the previous step, dense at step 0); the model-level runner
    installs the weight, reruns calibration up to this layer and returns the fresh statistics.
    Returns the final :class:`PrunedLayer`; ``extra["steps"]`` lists each step's sparsity and
    reconstruction error (on that step's statistics).
    """
    t0 = time.perf_counter()
    config.validate()
    check_layer(w, config, name)
    k = config.gradual_steps if steps is None else steps
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"[prune] steps must be an int >= 1, got {k!r}")
    if k > 1 and config.pattern_obj.fixed_sparsity() is not None:
        raise ValueError(
            f"[prune] pattern {config.pattern_obj} fixes the sparsity; gradual steps need an unstructured "
            f"or block pattern"
        )
    current = w.detach().clone()
    prior = None
    log = []
    result = None
    stats = None
    for j, s in enumerate(gradual_sparsities(config.sparsity, k)):
        stats = recalibrate(j, current)
        result = prune_weight(current, config, stats, name=name, sparsity=s, prior=prior)
        current, prior = result.weight, result.mask
        log.append(
            {
                "step": j,
                "sparsity": s,
                "achieved_sparsity": result.achieved_sparsity,
                "reconstruction_error": result.reconstruction_error,
            }
        )
    # the error of the final weight against the original dense weight, on the last statistics
    if stats is not None and stats.hessian is not None:
        result.reconstruction_error = relative_output_error(w, result.weight, stats.hessian)
    result.target_sparsity = config.sparsity
    result.seconds = time.perf_counter() - t0
    result.extra = {**result.extra, "gradual_steps": log}
    return result
