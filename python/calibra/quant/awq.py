"""AWQ: activation-aware per-channel scaling searched per decoder layer, folded into the model.

Lin et al., 2024 (AWQ); AutoAWQ's search. For a Linear ``y = W x`` and positive per-input-channel
factors ``s``, ``y = (W diag(s)) (x / s)``: the quantizer rounds ``W diag(s)``, whose salient columns (large
activations) are enlarged and so lose relatively less, and ``x / s`` is folded into whatever produces
``x``, so the model stays an ordinary checkpoint:

==============================  ====================================================================
input of                        produced by (where ``1 / s`` is folded)
==============================  ====================================================================
q/k/v                           ``input_layernorm`` (its weight ``/= s``)
gate/up (dense MLP)             ``post_attention_layernorm``
down_proj (dense MLP)           ``up_proj``'s rows (``act(gate) * up``: scaling up's output scales the product)
o_proj                          ``v_proj``'s rows, only where v_proj's outputs are o_proj's inputs one to one
                                (no grouped-query repetition: AutoAWQ's same condition)
==============================  ====================================================================

The search, per group (the Linears reading one input), on calibration statistics only:

* ``s(alpha) = a^alpha`` with ``a`` each input channel's activation magnitude, normalised as AutoAWQ
  does (``s / sqrt(max(s) min(s))``), for ``alpha`` on a grid ``k / grid``, ``k = 0 .. grid - 1``;
* loss = the group's output error ``sum_i tr(dW_i H dW_i^T)`` with ``dW_i = Q(W_i diag(s)) diag(1/s) - W_i``
  (``Q``: round-to-nearest on the config's grid) and ``H = sum x x^T`` the calibration Hessian -- exactly
  the squared error of the group's outputs on the calibration tokens, with no cached activations;
* ``alpha = 0`` (``s = 1``: no scaling) is a candidate and wins ties, so AWQ never raises the measured loss;
* before GPTQ, the alphas up to 0.3 are also solved with GPTQ on these statistics and the least GPTQ loss
  wins (:func:`search`'s ``solver``; alpha = 0 again a candidate): scales that help rounding can hurt GPTQ,
  whose error feedback already protects the salient columns. About 7 GPTQ solves per group (alpha <= 0.3).

The magnitude ``a``: AutoAWQ uses the mean ``|x_j|``; the observers calibra runs here hold no such sum
(``ChannelNormObserver`` has sum and sum of squares, ``RangeObserver`` min/max), so ``a`` is the RMS
``sqrt(H_jj / n)`` from the Hessian the search needs anyway (one statistic, no extra pass).

After folding, the quantizer solves on the scaled weights with the scaled Hessian
``H' = diag(1/s) H diag(1/s)``: re-collected from the folded layer by a true-sequential GPTQ, transformed
here (:meth:`AWQ.__call__`) when the statistics were collected before the fold (RTN, ``--stats``).

Groups exist only for explicit adapters (``act_ranges.smoothing_groups`` decides which norms fold, and MoE
blocks' norms also feed the router: their gate/up stay unscaled); MoE experts are not scaled.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from calibra.quant.act_ranges import smoothing_groups

DEFAULT_GRID = 20
MIN_SCALE = 1e-4  # AutoAWQ's floor of a^alpha: a dead channel (a = 0) keeps a finite factor


@dataclass
class ScaleGroup:
    """Linears reading one input (``consumers``: stats key -> module) and what produces that input."""

    name: str
    """For the report: ``"<layer>.input_layernorm -> q_proj,k_proj,v_proj"``."""
    producer: nn.Module
    producer_kind: str
    """``"norm"`` (an RMSNorm weight, divided by s) or ``"linear"`` (a Linear's output rows, divided by s)."""
    consumers: dict[str, nn.Module] = field(default_factory=dict)


def awq_groups(adapter, index: int, layer: nn.Module) -> list[ScaleGroup]:
    """The foldable scaling groups of decoder layer ``index`` (see the module docstring)."""
    if not getattr(adapter, "explicit", True):
        return []
    lname = adapter.layer_name(index)
    out = []
    for norm_name, norm, mods in smoothing_groups(adapter, index, layer):
        short = ",".join(k.rsplit(".", 1)[-1] for k in mods)
        out.append(ScaleGroup(f"{norm_name} -> {short}", norm, "norm", dict(mods)))
    lin = adapter.linear_modules(layer)
    by_role: dict[str, list[str]] = {}
    for n in lin:
        by_role.setdefault(adapter.role(n), []).append(n)
    pairs = [("v", "o"), ("up", "down")]
    for prev_role, next_role in pairs:
        prevs, nexts = by_role.get(prev_role, []), by_role.get(next_role, [])
        if len(prevs) != 1 or len(nexts) != 1:
            continue  # none, or several (a shared expert beside the MLP): the pairing is not certain
        p, c = prevs[0], nexts[0]
        if p.rsplit(".", 1)[0] != c.rsplit(".", 1)[0]:
            continue  # not siblings in one block
        if lin[p].out_features != lin[c].in_features:
            continue  # grouped-query attention: v's heads are repeated before o_proj
        out.append(ScaleGroup(f"{lname}.{p} -> {c.rsplit('.', 1)[-1]}", lin[p], "linear", {f"{lname}.{c}": lin[c]}))
    return out


def fake_quant(w: torch.Tensor, config) -> torch.Tensor:
    """Round-to-nearest of float32 ``w [out, in]`` on ``config``'s grid (bits, group, sym, format), dequantized.
    The search's quantizer for RTN and GPTQ alike (AutoAWQ's and llm-compressor's choice)."""
    from calibra.ops import dequantize, quantize

    qt = quantize(w, bits=config.bits, group_size=config.group_size, symmetric=config.sym, format=config.format)
    return dequantize(qt)


def candidate_scales(act: torch.Tensor, alpha: float) -> torch.Tensor:
    """float64 ``s = a^alpha`` floored at :data:`MIN_SCALE`, divided by ``sqrt(max(s) min(s))``; exactly 1 at 0."""
    if alpha == 0.0:
        return torch.ones_like(act, dtype=torch.float64)
    s = act.double().pow(alpha).clamp(min=MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def _trace(d: torch.Tensor, h: torch.Tensor) -> float:
    """``tr(D H D^T)``: the product in float32 (the search's inner loop: float64 matmuls are many times slower
    on GPUs and CPUs alike), the sum in float64. Every candidate, alpha = 0 included, is scored the same way."""
    return float(((d.float() @ h) * d.float()).double().sum())


def group_loss(weights: list[torch.Tensor], configs: list, h: torch.Tensor, s: torch.Tensor) -> float:
    """``sum_i tr(dW_i H dW_i^T)``, ``dW_i = Q(W_i diag(s)) / s - W_i`` (scaling in float64; a Linear whose
    config is None stays dense: no error)."""
    h32 = h.float()
    total = 0.0
    for w, cfg in zip(weights, configs):
        if cfg is None:
            continue
        w64 = w.double()
        q = fake_quant((w64 * s[None, :]).float(), cfg).double() / s[None, :]
        total += _trace(q - w64, h32)
    return total


def solver_loss(weights: list[torch.Tensor], configs: list, h: torch.Tensor, n: int, s: torch.Tensor) -> float:
    """:func:`group_loss` with each Linear solved by GPTQ (its own config) on the scaled weight and Hessian
    instead of rounded: the loss the GPTQ solve after the fold will have on these statistics."""
    from calibra.quant.gptq import gptq_quantize

    hs = scaled_hessian(h.float(), s)
    h32 = h.float()
    total = 0.0
    for w, cfg in zip(weights, configs):
        if cfg is None:
            continue
        w64 = w.double()
        q = gptq_quantize((w64 * s[None, :]).float(), hs, n, cfg, name="awq-search").dense().double() / s[None, :]
        total += _trace(q - w64, h32)
    return total


SOLVER_MARGIN = 0.02
"""With GPTQ a scaled alpha must lower the group's GPTQ loss on the calibration statistics by more than this
fraction of the unscaled loss (alpha = 0) to be kept. The search picks the least of about 11 measured losses on
the same tokens it is then judged on, so a gain of about 1% is mostly that pick's optimism: measured on
builtin:tiny-llama and tiny-moe W4 g128 (3 seeds), scales kept for a 0-3% calibration gain (mean 1.1%) left the
held-out KL of AWQ + GPTQ at or above GPTQ's. A group that clears the margin keeps the alpha with the least
measured loss."""

SOLVER_MAX_ALPHA = 0.3
"""With GPTQ the search scores alphas up to this with the solver itself (measured on builtin:tiny-llama: GPTQ's
best alpha is about 0.05-0.2, below rounding's 0.2-0.35, and its loss rises steeply past 0.3: 7 solves)."""


def search(
    weights: list[torch.Tensor],
    configs: list,
    h: torch.Tensor,
    n: int,
    grid: int = DEFAULT_GRID,
    *,
    solver: bool = False,
    margin: float = SOLVER_MARGIN,
) -> dict:
    """The best ``alpha`` of the grid for one group: ``{"alpha", "scales" (float64), "loss" (relative, rounding,
    at alpha), "loss_unscaled" (alpha = 0), "losses"}``. Relative = divided by ``sum_i tr(W_i H W_i^T)``.

    ``solver`` (GPTQ configs): the grid's alphas up to :data:`SOLVER_MAX_ALPHA` (and rounding's best, if
    above) are also solved with GPTQ, and the alpha with the least GPTQ loss is chosen (``rtn_alpha``,
    ``solver_loss``, ``solver_loss_unscaled``, ``solver_losses`` {alpha: loss} in the result). Scales that
    help rounding can hurt GPTQ, whose error feedback already protects the salient columns; alpha = 0 is
    again a candidate that wins ties, so AWQ + GPTQ never raises GPTQ's own loss on these statistics, and it
    is kept unless the least loss is below ``(1 - margin)`` times its own (:data:`SOLVER_MARGIN`; 0 keeps
    any strict gain)."""
    h32 = h.float()
    act = (h.double().diagonal().clamp(min=0) / max(n, 1)).sqrt()
    ref = sum(_trace(w, h32) for w, c in zip(weights, configs) if c is not None)
    ref = ref if ref > 0 else 1.0
    best = None
    losses = []
    for k in range(grid):
        alpha = k / grid
        s = candidate_scales(act, alpha)
        loss = group_loss(weights, configs, h32, s) / ref
        losses.append(loss)
        if best is None or loss < best[1]:  # strictly lower: alpha = 0 (first) wins ties
            best = (alpha, loss, s)
    out = {"alpha": best[0], "scales": best[2], "loss": best[1], "loss_unscaled": losses[0], "losses": losses}
    if solver:
        alphas = [k / grid for k in range(grid) if k / grid <= SOLVER_MAX_ALPHA]
        alphas += [best[0]] if best[0] not in alphas else []
        pick, unscaled, solved = None, None, {}
        for alpha in alphas:
            s = candidate_scales(act, alpha)
            loss = solver_loss(weights, configs, h, n, s) / ref
            solved[alpha] = loss
            if pick is None or loss < pick[1]:
                pick = (alpha, loss, s)
            if alpha == 0.0:
                unscaled = (alpha, loss, s)
        if not pick[1] < (1.0 - margin) * unscaled[1]:
            pick = unscaled  # a gain within the margin: no scaling (the measured GPTQ loss of alpha = 0)
        out["solver_loss_unscaled"] = unscaled[1]
        out["solver_losses"] = solved
        out["solver_margin"] = margin
        k = round(pick[0] * grid)
        out.update(rtn_alpha=best[0], alpha=pick[0], scales=pick[2], loss=losses[k], solver_loss=pick[1])
    return out


@torch.no_grad()
def fold(group: ScaleGroup, s: torch.Tensor) -> None:
    """``producer /= s`` (norm weight, or a Linear's output rows and bias) and every consumer's columns ``*= s``,
    computed in float64 and stored in each parameter's dtype. Exact in real arithmetic: the layer's
    function is unchanged (float64 models: to rounding, ~1e-15)."""
    s = s.double()

    def scale(p: torch.Tensor, f: torch.Tensor) -> None:
        p.copy_((p.double() * f.to(p.device)).to(p.dtype))

    prod = group.producer
    if group.producer_kind == "norm":
        scale(prod.weight, 1.0 / s)
        if getattr(prod, "bias", None) is not None:
            scale(prod.bias, 1.0 / s)
    else:
        scale(prod.weight, (1.0 / s)[:, None])
        if prod.bias is not None:
            scale(prod.bias, 1.0 / s)
    for mod in group.consumers.values():
        scale(mod.weight, s[None, :])


def scaled_hessian(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``diag(1/s) H diag(1/s)`` in ``h``'s dtype: the Hessian of the inputs ``x / s``."""
    inv = (1.0 / s.double()).to(h.device)
    return (h.double() * inv[:, None] * inv[None, :]).to(h.dtype)


def refuse_for_awq(*, resume: bool, act_ranges: bool) -> None:
    """Raise before any weight loads for what AWQ does not combine with yet."""
    if resume:
        raise ValueError(
            "[quantize] --resume with AWQ is not implemented: the layer checkpoints hold the quantized Linears, "
            "not the norms AWQ folded its scales into; rerun without --resume (or without --awq)"
        )
    if act_ranges:
        raise ValueError(
            "[quantize] AWQ and activation ranges / SmoothQuant smoothing both rescale the norms' outputs; "
            "use one of --awq and --act-ranges"
        )


class AWQ:
    """Runs before :class:`calibra.quant.apply.LayerQuantizer` solves a layer: search every group's scales
    on the layer's statistics, fold them, and return statistics that fit the folded layer.

    ``overrides``: module name -> config (mixed precision; ``None`` = kept dense), as the quantizer's."""

    def __init__(self, config, adapter, overrides: dict | None = None):
        self.config, self.adapter = config, adapter
        self.overrides = dict(overrides or {})
        self.grid = int(getattr(config, "awq_grid", DEFAULT_GRID))
        self.records: list[dict] = []

    def __call__(self, index: int, layer: nn.Module, stats, collect=None):
        """``collect(index, layer, keys)`` (true-sequential): the statistics are collected here, before the
        fold, and the quantizer re-collects each group's afterwards; without it ``stats`` holds the layer's
        Hessians (collected before the fold), returned as a copy with the scaled Hessians."""
        groups = awq_groups(self.adapter, index, layer)
        if not groups:
            return stats
        keys = [k for g in groups for k in g.consumers]
        if collect is not None:
            stats = collect(index, layer, keys)
        found = []
        for g in groups:
            first = next(iter(g.consumers))
            h = stats.tensors.get(f"hessian/sum/{first}")
            if h is None:
                raise ValueError(f"[quantize] AWQ needs the calibration Hessian of {first}; none was collected")
            n = stats.count("hessian", first)
            names = list(g.consumers)
            cfgs = [self.overrides.get(k, self.config) for k in names]
            ws = [g.consumers[k].weight.detach() for k in names]
            gptq = [c for c in cfgs if c is not None and getattr(c, "method", "") == "gptq"]
            r = search(ws, cfgs, h, n, self.grid, solver=bool(gptq))
            found.append((g, r))
            rec = {"layer": index, "group": g.name}
            rec.update({k: v for k, v in r.items() if k not in ("scales", "losses")})
            self.records.append(rec)
        for g, r in found:
            fold(g, r["scales"])
        if collect is not None:
            return stats  # the quantizer re-collects each group from the folded layer before solving it
        out = copy.copy(stats)
        out.tensors = dict(stats.tensors)  # the caller's statistics (a --stats file) stay as they were
        done: dict[int, torch.Tensor] = {}
        for g, r in found:
            for k in g.consumers:
                key = f"hessian/sum/{k}"
                h = stats.tensors[key]
                if id(h) not in done:  # q/k/v share one Hessian: scaled once, still shared
                    done[id(h)] = scaled_hessian(h, r["scales"])
                out.tensors[key] = done[id(h)]
        return out

    def report(self) -> dict:
        """For report.json: the statistic, the grid, and per group the chosen alpha and the relative output
        loss of the group before (no scaling) and after."""
        return {
            "activation_statistic": "rms = sqrt(diag(H) / n)",
            "grid": self.grid,
            "groups": self.records,
        }


__all__ = [
    "AWQ",
    "refuse_for_awq",
    "ScaleGroup",
    "awq_groups",
    "search",
    "fold",
    "scaled_hessian",
    "candidate_scales",
    "group_loss",
]
