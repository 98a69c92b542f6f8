"""Model-level pruning: which weights of a decoder layer are pruned, from which statistics, and how the
result is written back into the model.

The calibration runner (``calibra.calib.LayerRunner``) calls :class:`LayerPruner` as its ``on_layer``
callback with the layer on the compute device and that layer's statistics just collected; with
``feed_compressed=True`` the next layer is calibrated on what the *pruned* layer outputs (SparseGPT's
sequential scheme). Magnitude pruning needs no data: the driver calls the pruner on every layer with
``stats=None``.

Targets are the quantizer's (:func:`calibra.quant.apply.layer_targets`): every ``nn.Linear`` the
adapter lists and every expert projection of an MoE block -- for transformers-5 fused experts the 2-D
slice ``experts.gate_up_proj[e]`` / ``experts.down_proj[e]`` of the 3-D parameter, written back in place.
Routers, embeddings and lm_head are never pruned. All targets of a layer are pruned from the same
statistics (the layer's inputs as the already-pruned earlier layers produce them).

Statistics per target (:func:`target_stats`): a Linear uses its raw Hessian sum ``X^T X`` and token
count (SparseGPT; the reconstruction error), and its per-channel sums of squares (Wanda). An expert
uses its mean Hessian shrunk toward the layer's pooled one (``CalibrationStats.hessian``) and, for
Wanda, per-channel mean squares shrunk the same way (:func:`expert_sumsq`), so an expert that saw few
or no tokens still gets finite, meaningful scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from calibra.mps import on_host
from calibra.prune.config import PruningConfig
from calibra.prune.gradual import prune_gradually
from calibra.prune.methods import prune_weight
from calibra.prune.result import LayerStats, PrunedLayer
from calibra.prune.stages import PruningStage, StageTracker
from calibra.quant.apply import Target, layer_targets
from calibra.quant.gptq import SharedFactorizations

DEFAULT_TAU = 256.0


def _split_expert(key: str) -> tuple[str, int, str]:
    block, rest = key.rsplit(".experts.", 1)
    e, proj = rest.split(".", 1)
    return block, int(e), proj


def expert_sumsq(stats, key: str) -> torch.Tensor:
    """Per-channel mean squares of an expert projection's inputs, shrunk toward the layer's pooled mean
    with ``lambda = tau / (n_e + tau)`` (the Hessian's rule, ``calibra.calib.moe.shrunk_hessian``)."""
    moe = stats.metadata.get("moe", {})
    tau = float(moe.get("tau") if moe.get("tau") is not None else DEFAULT_TAU)
    block, _, proj = _split_expert(key)
    E = int(moe.get("blocks", {}).get(block, {}).get("num_experts", 0))
    if E == 0:
        E = 1 + max(_split_expert(m)[1] for m in stats.modules("norms") if m.startswith(block + ".experts."))
    keys = [f"{block}.experts.{i}.{proj}" for i in range(E)]
    n_e = stats.count("norms", key)
    n_pool = sum(stats.count("norms", k) for k in keys)
    if n_pool == 0:
        raise ValueError(
            f"[prune] no expert of {block} received any calibration token; use more or different calibration data"
        )
    lam = 1.0 if n_e == 0 else tau / (n_e + tau)
    with on_host():  # float64 statistics, kept on the CPU (MPS has no float64)
        pooled = sum(stats.tensors[f"norms/sumsq/{k}"].double() for k in keys) / n_pool
        if lam == 1.0:
            return pooled
        return (1 - lam) * stats.tensors[f"norms/sumsq/{key}"].double() / n_e + lam * pooled


def target_stats(stats, target: Target) -> tuple[LayerStats | None, int]:
    """``(LayerStats for the solvers, tokens the target saw)``; ``(None, 0)`` without statistics."""
    if stats is None:
        return None, 0
    key = target.stats_key
    has_h = f"hessian/sum/{key}" in stats.tensors
    has_n = f"norms/sumsq/{key}" in stats.tensors
    if target.expert:
        tokens = stats.count("hessian" if has_h else "norms", key)
        h = stats.hessian(key) if has_h else None  # shrunk mean: solvers only need it up to a scale
        sq = expert_sumsq(stats, key) if has_n else None
        return LayerStats(hessian=h, n_tokens=1, channel_sumsq=sq), tokens
    if not (has_h or has_n):
        raise ValueError(
            f"[prune] no calibration statistics for {target.name}; calibrate this model with the "
            f"'hessian' (SparseGPT) or 'norms' (Wanda) observer"
        )
    tokens = stats.count("hessian" if has_h else "norms", key)
    return LayerStats(
        hessian=stats.tensors.get(f"hessian/sum/{key}"),
        n_tokens=tokens,
        channel_sumsq=stats.tensors.get(f"norms/sumsq/{key}"),
    ), tokens


def weight_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``||W - W_hat||_F^2 / ||W||_F^2``: the data-free error (the only one magnitude has without data)."""
    with on_host():  # float64 on the CPU (MPS has none): the same numbers on every device
        wd = w.cpu().double()
        den = float(wd.square().sum())
        return float((wd - w_hat.cpu().double()).square().sum()) / den if den > 0 else 0.0


class LayerPruner:
    """The ``on_layer`` callback that prunes a decoder layer in place.

    Args:
        config: the validated :class:`PruningConfig`.
        adapter: the model's ``ModelAdapter``.
        dense: module names left dense (``plan_layers``' second result: indivisible widths).
        tracker: the run's :class:`StageTracker` (``computing_importance`` -> ``pruning`` per layer, and
            back to ``calibrating`` before the next layer when the runner collects statistics).
        recollect: ``recollect(index, layer) -> stats`` (``LayerRunner.recollect``) for the data-only
            gradual mode; None prunes each target in one step.
        num_layers: decoder layers in the model (the last one does not announce another calibration).
        on_module: called with every finished :class:`PrunedLayer`.
    """

    def __init__(
        self,
        config: PruningConfig,
        adapter,
        *,
        dense=(),
        tracker: StageTracker | None = None,
        recollect: Callable | None = None,
        num_layers: int = 0,
        calibrating: bool = False,
        on_module: Callable | None = None,
    ):
        self.config, self.adapter = config, adapter
        self.dense_names = set(dense)
        self.tracker = tracker
        self.recollect = recollect
        self.num_layers = num_layers
        self.calibrating = calibrating
        self.on_module = on_module
        self.parallel = None
        """Solver parallelism across the ranks of a distributed job (``calibra.jobs.distributed.World``, as
        ``LayerQuantizer.parallel``); not used by the gradual mode, whose steps re-collect statistics."""
        self.layers: dict[str, PrunedLayer] = {}
        self.solved_by: dict[str, int] = {}  # module -> the rank that pruned it (with ``parallel``)
        self.dense: list[str] = []
        self.layer_seconds: list[float] = []

    def _advance(self, stage: PruningStage, detail: str) -> None:
        if self.tracker is not None:
            self.tracker.advance(stage, detail)

    def _gradual(self, index: int, layer: nn.Module, t: Target):
        """``recalibrate(step, weight)`` for :func:`prune_gradually`: install the weight, re-collect the
        layer's statistics from the same inputs (data methods), return the target's LayerStats."""

        def recalibrate(step: int, current: torch.Tensor):
            t.store(current)
            if self.recollect is None or not self.config.requires_calibration():
                return None
            return target_stats(self.recollect(index, layer), t)[0]

        return recalibrate

    @torch.no_grad()
    def __call__(self, index: int, layer: nn.Module, stats) -> None:
        t0 = time.perf_counter()
        lname = self.adapter.layer_name(index)
        self._advance(PruningStage.COMPUTING_IMPORTANCE, lname)
        targets = layer_targets(self.adapter, index, layer)
        work = []
        for t in targets:
            if t.name in self.dense_names:
                self.dense.append(t.name)
                continue
            work.append((t, *target_stats(stats, t)))
        self._advance(PruningStage.PRUNING, lname)
        shared = SharedFactorizations()  # q/k/v (gate/up) read one Hessian: SparseGPT factors it once
        owners = self._owners(work)
        for k, (t, ls, tokens) in enumerate(work):
            res = None
            if owners is None or owners[k] == self.parallel.rank:
                res = self._prune(index, layer, t, ls, tokens, shared)
            if owners is not None:
                res = self.parallel.share(res, owners[k])  # the owner's result, on every rank
                self.solved_by[t.name] = owners[k]
            t.store(res.weight)
            res.mask = res.mask.cpu()
            res.weight = None
            res.quantized = None
            self.layers[t.name] = res
            if self.on_module is not None:
                self.on_module(res)
        if self.calibrating and index + 1 < self.num_layers:
            self._advance(PruningStage.CALIBRATING, self.adapter.layer_name(index + 1))
        self.layer_seconds.append(time.perf_counter() - t0)

    def _owners(self, work: list) -> list[int] | None:
        """The rank that prunes each target (distributed jobs), by estimated cost: SparseGPT's sweep and
        factorization about out x in^2 + in^3, a scoring method out x in."""
        if self.parallel is None or self.config.gradual_steps > 1:
            return None
        sweep = self.config.method_enum.value == "sparsegpt"
        costs = []
        for t, _, _ in work:
            out_f, in_f = float(t.out_features), float(t.in_features)
            costs.append(out_f * in_f * in_f + in_f**3 if sweep else out_f * in_f)
        return self.parallel.owners(costs)

    def _prune(self, index: int, layer: nn.Module, t: Target, ls, tokens, shared) -> PrunedLayer:
        """One target pruned (its result still holding the pruned weight), with the log's extras."""
        w = t.weight().detach().clone()
        if self.config.gradual_steps > 1:
            res = prune_gradually(w, self.config, self._gradual(index, layer, t), name=t.name)
        else:
            res = prune_weight(w, self.config, ls, name=t.name, shared=shared)
        # the caller keeps the mask and the log only: the pruned weight lives in the model (no second copy of
        # every weight in memory), and joint-quantization codes are summarized in the log
        # zero_fraction >= achieved_sparsity: a kept weight can also be 0 (dead channel, or joint
        # quantization rounding it to the zero point)
        res.extra = {
            **res.extra,
            "samples": tokens,
            "weight_error": weight_error(w, res.weight),
            "zero_fraction": float((res.weight == 0).sum()) / res.weight.numel(),
            "shape": [t.out_features, t.in_features],
            "expert": t.expert,
        }
        if res.quantized is not None:
            q = res.quantized
            res.extra["quantized_bits"] = q.bits
            res.extra["joint_quantization"] = {
                "bits": q.bits,
                "group_size": q.group_size,
                "symmetric": q.symmetric,
                "format": q.format,
            }
        return res


__all__ = ["LayerPruner", "target_stats", "expert_sumsq", "weight_error"]
