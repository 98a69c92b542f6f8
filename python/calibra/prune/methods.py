"""Magnitude and Wanda: a score per weight, then the pattern's exact selection, then the zeros.

- Magnitude: score ``|w|`` (or ``w^2``; the same order per element, different block sums). Compared
  across the whole layer by default (``scope="layer"``), the classic global-per-layer rule.
- Wanda (Sun et al., 2023): score ``|w_ij| * ||X_j||_2`` with ``||X_j||_2 = sqrt(sum_t x_tj^2)`` over the
  calibration tokens, compared within each output row (``scope="row"``, as the paper does: rows are
  pruned to the same sparsity, which the paper found clearly better than per-layer comparison).

Token counts do not matter to either: scaling every channel norm by one constant leaves each row's
order unchanged. A dead input channel (never fired: ``||X_j|| = 0``) scores 0 and goes first -- its
weights cannot change the layer's output on the calibration data.

:func:`prune_weight` dispatches on the config's method (SparseGPT included).
"""

from __future__ import annotations

import contextlib
import time

import torch

from calibra.mps import mps_semantics, on_host
from calibra.prune.checks import check_layer, check_weight  # noqa: F401  (re-exported)
from calibra.prune.config import PruneMethod, PruningConfig
from calibra.prune.patterns import achieved_sparsity
from calibra.prune.result import LayerStats, PrunedLayer, relative_output_error


def magnitude_scores(w: torch.Tensor, score: str = "abs") -> torch.Tensor:
    """fp32 ``|w|`` or ``w^2``."""
    wf = w.float()
    return wf.abs() if score == "abs" else wf.square()


def wanda_scores(w: torch.Tensor, channel_sumsq: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """fp32 ``|w_ij| * sqrt(channel_sumsq_j)``; ``channel_sumsq`` is ``[in]``, float32 or float64."""
    if not isinstance(channel_sumsq, torch.Tensor) or tuple(channel_sumsq.shape) != (w.shape[1],):
        got = tuple(channel_sumsq.shape) if isinstance(channel_sumsq, torch.Tensor) else type(channel_sumsq).__name__
        raise ValueError(f"[wanda] the channel statistics of {name} must be [in] = [{w.shape[1]}], got {got}")
    host = mps_semantics(w.device)  # MPS has no float64: the norm is taken on the CPU
    with on_host() if host else contextlib.nullcontext():
        sq = (channel_sumsq.cpu() if host else channel_sumsq).double()
        if not bool(torch.isfinite(sq).all()) or bool((sq < 0).any()):
            raise ValueError(
                f"[wanda] the channel sums of squares of {name} must be finite and >= 0; check the calibration "
                "activations"
            )
        # the norm in float64, then fp32: sums of squares of fp16-range activations over many tokens can
        # exceed fp32's range before the square root
        norm = sq.sqrt().float()
    return w.float().abs() * norm.to(w.device)[None, :]


def _finish(w, keep, config, name, method, sparsity, t0, hessian, **extra) -> PrunedLayer:
    pruned = w.masked_fill(~keep, 0)
    err = None if hessian is None else relative_output_error(w, pruned, hessian)
    return PrunedLayer(
        name=name,
        method=method,
        pattern=str(config.pattern_obj),
        weight=pruned,
        mask=keep,
        target_sparsity=sparsity,
        achieved_sparsity=achieved_sparsity(keep),
        reconstruction_error=err,
        seconds=time.perf_counter() - t0,
        **extra,
    )


def prune_magnitude(
    w: torch.Tensor,
    config: PruningConfig,
    *,
    name: str = "weight",
    sparsity: float | None = None,
    prior: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> PrunedLayer:
    """Magnitude pruning of ``w [out, in]`` (not modified). ``sparsity`` overrides the config's target
    (gradual steps); ``prior`` is a keep-mask whose pruned entries stay pruned; ``hessian`` (optional)
    only feeds the reported reconstruction error."""
    t0 = time.perf_counter()
    config.validate()
    check_layer(w, config, name)
    s = config.sparsity if sparsity is None else sparsity
    keep = config.pattern_obj.mask(magnitude_scores(w, config.magnitude_score), s, config.resolved_scope, prior)
    return _finish(w, keep, config, name, "magnitude", s, t0, hessian)


def prune_wanda(
    w: torch.Tensor,
    channel_sumsq: torch.Tensor,
    config: PruningConfig,
    *,
    name: str = "weight",
    sparsity: float | None = None,
    prior: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> PrunedLayer:
    """Wanda pruning of ``w [out, in]`` (not modified) from per-input-channel sums of squares."""
    t0 = time.perf_counter()
    config.validate()
    check_layer(w, config, name)
    s = config.sparsity if sparsity is None else sparsity
    scores = wanda_scores(w, channel_sumsq, name)
    keep = config.pattern_obj.mask(scores, s, config.resolved_scope, prior)
    with on_host():  # the float64 sums stay where they are (on a Mac: the CPU)
        dead = int((channel_sumsq == 0).sum())
    return _finish(w, keep, config, name, "wanda", s, t0, hessian, dead_channels=dead)


def prune_weight(
    w: torch.Tensor,
    config: PruningConfig,
    stats: LayerStats | None = None,
    *,
    name: str = "weight",
    sparsity: float | None = None,
    prior: torch.Tensor | None = None,
    shared=None,
) -> PrunedLayer:
    """Prune one weight with the config's method; ``stats`` holds what the method needs (nothing for
    magnitude, ``channel_sumsq`` or a Hessian for Wanda, the Hessian sum + token count for SparseGPT).
    ``shared``: a :class:`calibra.quant.gptq.SharedFactorizations` for weights that read one Hessian."""
    method = config.method_enum
    h = None if stats is None else stats.hessian
    if method is PruneMethod.MAGNITUDE:
        return prune_magnitude(w, config, name=name, sparsity=sparsity, prior=prior, hessian=h)
    if stats is None:
        raise ValueError(
            f"[prune] method {method.value} needs calibration statistics for {name}; pass LayerStats "
            f"(run calibration first)"
        )
    if method is PruneMethod.WANDA:
        sq = stats.sumsq()
        if sq is None:
            raise ValueError(
                f"[wanda] {name} has no channel statistics (channel_sumsq or hessian); calibrate with "
                f"the 'norms' observer"
            )
        return prune_wanda(w, sq, config, name=name, sparsity=sparsity, prior=prior, hessian=h)
    from calibra.prune.sparsegpt import sparsegpt_prune

    if h is None:
        raise ValueError(f"[sparsegpt] {name} has no Hessian; calibrate with the 'hessian' observer")
    return sparsegpt_prune(w, h, stats.n_tokens, config, name=name, sparsity=sparsity, prior=prior, shared=shared)
