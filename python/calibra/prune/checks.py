"""Argument checks of the pruning solvers (one copy for magnitude, Wanda, SparseGPT and the gradual
mode), below every solver module so that each imports them without importing another solver."""

from __future__ import annotations

import torch

from calibra.finite import first_nonfinite
from calibra.prune.config import PruningConfig

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_weight(w, name: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"[prune] the weight of {name} must be a 2-D tensor [out, in], got {got}")
    if w.dtype not in _FLOATS:
        raise TypeError(f"[prune] the weight of {name} must be float32, float16 or bfloat16, got {w.dtype}")
    bad = first_nonfinite(w)
    if bad is not None:
        r, c = bad
        raise ValueError(f"[prune] the weight of {name} contains NaN/Inf (first at row {r}, col {c})")


def check_layer(w, config: PruningConfig, name: str) -> None:
    check_weight(w, name)
    problem = config.layer_problem(name, w.shape[0], w.shape[1])
    if problem:
        raise ValueError(
            f"[prune] {problem}; choose a pattern that divides it, or let the model-level run leave "
            f"it dense (skip_indivisible=True)"
        )
