"""MaskCallback: schedule-driven pruning inside a training loop.

Call ``on_step(step, model)`` after every optimizer step. At the schedule's prune steps it recomputes
each target Linear's keep-mask at ``schedule.sparsity_at_step(step)`` from the current weights (pruned
weights are forced to stay pruned, so masks only grow, as in Zhu & Gupta); at every step it
multiplies the weights by their masks again, because an optimizer step (momentum, weight decay, Adam's
update) moves pruned weights off zero.

Scores are magnitude by default (training has no calibration pass); ``scorer(name, module)`` may
return any fp32 ``[out, in]`` score instead (e.g. Wanda with running activation norms).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from calibra.prune.config import PruningConfig
from calibra.prune.methods import magnitude_scores


class MaskCallback:
    def __init__(
        self,
        config: PruningConfig,
        *,
        modules: Callable[[str, nn.Module], bool] | None = None,
        scorer: Callable[[str, nn.Module], torch.Tensor] | None = None,
    ):
        """``modules(name, module)`` selects the Linears to prune (default: every nn.Linear)."""
        self.config = config.validate()
        self.schedule = config.resolved_schedule()
        self.pattern = config.pattern_obj
        self.select = modules or (lambda name, mod: True)
        self.scorer = scorer
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0
        self.history: list[tuple[int, float]] = []

    def targets(self, model: nn.Module):
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and self.select(name, mod):
                yield name, mod

    @torch.no_grad()
    def on_step(self, step: int, model: nn.Module) -> bool:
        """Apply the schedule at ``step``; returns True when masks were recomputed."""
        changed = False
        if self.schedule.is_prune_step(step):
            s = self.schedule.sparsity_at_step(step)
            for name, mod in self.targets(model):
                w = mod.weight
                problem = self.config.layer_problem(name, w.shape[0], w.shape[1])
                if problem:
                    if self.config.skip_indivisible:
                        continue
                    raise ValueError(f"[prune] {problem}; set skip_indivisible=True to leave it dense")
                scores = self.scorer(name, mod) if self.scorer else magnitude_scores(w, self.config.magnitude_score)
                self.masks[name] = self.pattern.mask(scores, s, self.config.resolved_scope, self.masks.get(name))
            self.sparsity = s
            self.history.append((step, s))
            changed = True
        for name, mod in self.targets(model):
            keep = self.masks.get(name)
            if keep is not None:
                mod.weight.mul_(keep.to(mod.weight.dtype))
        return changed
