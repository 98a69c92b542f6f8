"""Model-level quantization: which weights of a decoder layer are quantized, in what order, from which
statistics, and how the result is written back into the model.

The calibration runner (``calibra.calib.LayerRunner``) calls :class:`LayerQuantizer` as its ``on_layer``
callback with the layer on the compute device and that layer's statistics just collected. The quantizer

* finds the layer's targets (:func:`layer_targets`): every ``nn.Linear`` the adapter lists (q/k/v/o,
  gate/up/down, shared experts) and every expert projection of an MoE block -- for transformers-5
  fused experts the 2-D slice ``experts.gate_up_proj[e]`` ``[2I, H]`` / ``experts.down_proj[e]``
  ``[H, I]`` of the 3-D parameter. Routers, embeddings and lm_head are never targets;
* quantizes them group by group in execution order -- (q, k, v) -> o -> (gate, up) -> down -- and,
  with ``true_sequential`` (AutoGPTQ's option, on by default), asks the runner for each group's
  Hessians just before solving it (``LayerRunner.collect``), so o_proj is solved on the outputs of the
  *quantized* q/k/v, and so on. Each collection hooks only that group's modules and stops the layer's
  forward at the last of them, and q/k/v (gate/up) share one Hessian: the four collections cost about
  one and a half forward passes of the layer, not four;
* writes each result's effective dense weight (``QuantizedLayer.dense()``, rotation undone) back into
  the parameter in place, so the runner feeds the next layer what the quantized model computes.

Experts use their own Hessian shrunk toward the layer's pooled one (``CalibrationStats.hessian``), so an
expert that saw few or no tokens still gets a finite, well-conditioned Hessian.

This module imports no calibration code: statistics arrive as a duck-typed ``CalibrationStats``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from calibra.models.linear import in_out, is_conv1d, store_weight, weight_view
from calibra.quant.awq import AWQ
from calibra.quant.config import GPTQConfig, MRGPTQConfig, RTNConfig
from calibra.quant.gptq import SharedFactorizations, gptq_quantize
from calibra.quant.mr_gptq import mr_gptq_quantize
from calibra.quant.result import QuantizedLayer
from calibra.quant.rtn import rtn_quantize

# execution order of the roles inside a decoder layer (true-sequential groups)
GROUPS = (("q", "k", "v"), ("o",), ("gate", "up", "gate_up"), ("down",), ("other",))


@dataclass
class Target:
    """One weight to quantize: ``weight()`` gives the 2-D ``[out, in]`` view, ``store(w)`` writes back."""

    name: str
    """QuantizedModel key (module path; ``<block>.experts.<e>.gate_up_proj``/``down_proj`` for fused)."""
    stats_key: str
    """Hessian key in the statistics."""
    role: str
    in_features: int
    out_features: int
    expert: bool
    weight: Callable[[], torch.Tensor]
    store: Callable[[torch.Tensor], None]
    transposed: bool = False
    """The module stores its weight ``[in, out]`` (GPT-2's Conv1D); ``weight()`` is a transposed view."""

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


def _linear_target(name: str, stats_key: str, mod: nn.Module, expert: bool, role: str) -> Target:
    """A Linear-like module (``nn.Linear`` or a transposed ``Conv1D``, see ``calibra.models.linear``)."""
    n_in, n_out = in_out(mod)
    return Target(
        name=name,
        stats_key=stats_key,
        role=role,
        in_features=n_in,
        out_features=n_out,
        expert=expert,
        weight=lambda mod=mod: weight_view(mod),
        store=lambda w, mod=mod: store_weight(mod, w),
        transposed=is_conv1d(mod),
    )


def _slice_target(name: str, experts: nn.Module, proj: str, e: int, role: str) -> Target:
    """Expert ``e``'s 2-D slice of a fused ``proj`` as a Linear weight ``[out, in]`` (a transposed view for
    GPT-OSS's ``x @ W`` layout, ``compat.transformers.expert_slice``), written back in place."""
    from calibra.compat.transformers import expert_slice, store_expert_slice

    out_f, in_f = expert_slice(experts, proj, e).shape
    return Target(
        name=name,
        stats_key=name,
        role=role,
        in_features=in_f,
        out_features=out_f,
        expert=True,
        weight=lambda: expert_slice(experts, proj, e),
        store=lambda w: store_expert_slice(experts, proj, e, w),
    )


def layer_targets(adapter, index: int, layer: nn.Module) -> list[Target]:
    """Every quantizable weight of decoder layer ``index``, in module order (see the module docstring)."""
    lname = adapter.layer_name(index)
    # roles come from the adapter's one table (ModelAdapter.role: q/k/v/o/gate/up/down by attribute name)
    out = [
        _linear_target(f"{lname}.{n}", f"{lname}.{n}", m, False, adapter.role(n))
        for n, m in adapter.linear_modules(layer).items()
    ]
    for block in adapter.moe_blocks(layer):
        pre = f"{lname}.{block.name}.experts"
        for e in range(block.num_experts):
            if block.fused:
                ex = block.experts
                out.append(_slice_target(f"{pre}.{e}.gate_up_proj", ex, "gate_up_proj", e, "gate_up"))
                out.append(_slice_target(f"{pre}.{e}.down_proj", ex, "down_proj", e, "down"))
                continue
            for n, m in block.experts[e].named_children():
                if isinstance(m, nn.Linear):
                    role = adapter.role(n)
                    key = f"{pre}.{e}.{'down_proj' if role == 'down' else 'gate_up_proj'}"
                    out.append(_linear_target(f"{pre}.{e}.{n}", key, m, True, role))
    return out


def hessian_for(stats, target: Target) -> tuple[torch.Tensor, int, int]:
    """``(H, n, tokens)`` for the solvers (which use ``2 H / n``): the raw sum and its count for a Linear;
    for an expert the shrunk mean Hessian with n = 1 (``tokens`` is the expert's real count, logged)."""
    if target.expert:
        tokens = stats.count("hessian", target.stats_key)
        return stats.hessian(target.stats_key), 1, tokens
    key = f"hessian/sum/{target.stats_key}"
    if key not in stats.tensors:
        raise ValueError(
            f"[quantize] no Hessian for {target.name} in the calibration statistics; calibrate "
            f"with the 'hessian' observer on this model"
        )
    n = stats.count("hessian", target.stats_key)
    return stats.tensors[key], n, n


def solve(
    target: Target,
    config,
    stats,
    layer: int | None,
    *,
    consume: bool = False,
    shared: SharedFactorizations | None = None,
) -> QuantizedLayer:
    """Quantize one target with ``config`` (plain RTN needs no statistics). ``consume``: GPTQ may work in the
    memory of the target's weight and Hessian (no later target reads them). ``shared``: the group's
    factorizations (targets that read one Hessian factor it once)."""
    w = target.weight()
    if isinstance(config, RTNConfig) and not config.clip_on_output:
        return rtn_quantize(w, config, name=target.name, layer=layer)
    h, n, tokens = hessian_for(stats, target)
    h = h.to(w.device)
    if isinstance(config, RTNConfig):
        ql = rtn_quantize(w, config, name=target.name, layer=layer, h=h, n_tokens=n)
    elif isinstance(config, MRGPTQConfig):
        ql = mr_gptq_quantize(w, h, n, config, name=target.name, layer=layer)
    elif isinstance(config, GPTQConfig):
        cross = None
        if getattr(config, "gptaq", False):
            cross = None if target.expert else stats.tensors.get(f"gptaq/cross/{target.stats_key}")
            if cross is None:
                if not target.expert:
                    raise ValueError(
                        f"[quantize] gptaq needs the cross statistic of {target.name} (gptaq/cross/...), which "
                        f"the calibration runner collects with gptaq=True; it is missing"
                    )
                # an expert's tokens are routed by each model on its own: no pairing, plain GPTQ
                config = dataclasses.replace(config, gptaq=False, gptaq_choose=False)
            else:
                cross = cross.to(w.device)
        ql = gptq_quantize(
            w,
            h,
            n,
            config,
            name=target.name,
            layer=layer,
            consume=consume and not target.expert,
            shared=None if target.expert else shared,  # an expert's shrunk Hessian is its own
            cross=cross,
        )
    else:
        raise TypeError(f"[quantize] config must be RTNConfig, GPTQConfig or MRGPTQConfig, got {type(config).__name__}")
    ql.log.samples = tokens
    return ql


def reads_hessian(config) -> bool:
    """True when solving with ``config`` reads the calibration Hessian (GPTQ, MR-GPTQ, RTN with the
    output-error clip search); plain RTN is data-free."""
    return not isinstance(config, RTNConfig) or config.needs_hessian


class LayerQuantizer:
    """The ``on_layer`` callback that quantizes a decoder layer in place.

    Args:
        config: the validated RTNConfig / GPTQConfig / MRGPTQConfig.
        adapter: the model's ``ModelAdapter``.
        overrides: module name -> config to use instead (mixed precision), or ``None`` to keep it dense.
        collect: ``collect(index, layer, keys) -> stats`` (``LayerRunner.collect`` of a runner made with
            ``collect_on_demand=True``) for true-sequential: each group's Hessians are collected just
            before it is solved. ``None`` quantizes every group from the statistics ``__call__`` receives.
        freeze: ``freeze(index, module)`` (``LayerRunner.freeze``): called with the attention block once
            its last target is quantized, so later passes of the layer replay its output.
        on_module: called with each finished ``QuantizedLayer`` (progress, logging).
        keep_dense: keep each result's dequantized weight (``QuantizedLayer.weight``); a streamed job passes
            False (the weight is written back into the layer, and the layer is written and freed).
        consume: let GPTQ solve in the memory of each weight and of its Hessian when no later target of the
            layer reads that Hessian (q/k/v share one: only v's solve consumes it). Only for callers whose
            statistics die with the layer (a runner with ``keep_layer_stats=False``).
    """

    def __init__(
        self,
        config,
        adapter,
        *,
        overrides: dict | None = None,
        collect: Callable | None = None,
        freeze: Callable | None = None,
        on_module: Callable | None = None,
        keep_dense: bool = True,
        consume: bool = False,
    ):
        self.config, self.adapter = config, adapter
        self.keep_dense, self.consume = keep_dense, consume
        self.overrides = dict(overrides or {})
        self.collect, self.freeze = collect, freeze
        self.release: Callable | None = None
        """``release(index, keys)`` (``LayerRunner.release``): with ``consume``, called after each group's
        solve so its Hessians are freed before the next group's."""
        self.input_groups: Callable | None = None
        """``input_groups(index, layer)`` (``LayerRunner.input_groups``): for an adapter without roles (the
        structural one), the layer's Linear keys in execution order, grouped by shared input -- the
        true-sequential groups. Without it such a layer is solved as one group."""
        self.on_module = on_module
        self.parallel = None
        """Solver parallelism across the ranks of a distributed job (``calibra.jobs.distributed.World``):
        ``parallel.owners(costs)`` assigns each solve of a group to a rank, ``parallel.rank`` is this one,
        ``parallel.share(result, owner)`` gives every rank the owner's result. None: this process solves all."""
        self.awq = AWQ(config, adapter, self.overrides) if getattr(config, "awq", False) else None
        """AWQ's scale search + fold before each layer's solve (``config.awq``); its ``records`` go to the report."""
        self.layers: dict[str, QuantizedLayer] = {}
        self.solved_by: dict[str, int] = {}  # module -> the rank that solved it (with ``parallel``)
        self.dense: list[str] = []
        self.layer_seconds: list[float] = []

    @property
    def true_sequential(self) -> bool:
        return bool(getattr(self.config, "true_sequential", False)) and self.collect is not None

    def __call__(self, index: int, layer: nn.Module, stats) -> None:
        t0 = time.perf_counter()
        if self.awq is not None:  # scales folded first; stats then fit the folded layer (calibra.quant.awq)
            stats = self.awq(index, layer, stats, collect=self.collect if self.true_sequential else None)
        targets = layer_targets(self.adapter, index, layer)
        attn_left = self._attention_targets(index, layer, targets) if self.freeze is not None else None
        for members in self._groups(index, layer, targets):
            group = [(t, self.overrides.get(t.name, self.config)) for t in members]
            needs = [t.stats_key for t, cfg in group if cfg is not None and reads_hessian(cfg)]
            if needs and self.true_sequential:
                stats = self.collect(index, layer, needs)
            shared = SharedFactorizations()  # q/k/v (gate/up) read one Hessian: factored once, dropped after
            owners = self._owners(group, stats)
            for k, (t, cfg) in enumerate(group):
                if cfg is None or self._never_called(t, cfg, stats):
                    self.dense.append(t.name)
                    continue
                last = self._last_reader(t, group[k + 1 :], stats)
                ql = None
                if owners is None or owners[k] == self.parallel.rank:
                    ql = solve(t, cfg, stats, index, consume=self.consume and last, shared=shared)
                if owners is not None:
                    ql = self.parallel.share(ql, owners[k])  # the owner's result, on every rank
                    self.solved_by[t.name] = owners[k]
                t.store(ql.dense())
                if not self.keep_dense:  # the layer holds the effective weight now; the codes say the rest
                    ql.weight = ql.weight.to("meta")
                self.layers[t.name] = ql
                if self.on_module is not None:
                    self.on_module(ql)
            del shared
            if self.consume and self.release is not None and needs:
                self.release(index, needs)  # solved: these Hessians are not read again
                for key in needs:
                    stats.tensors.pop(f"hessian/sum/{key}", None)
            if attn_left:
                attn_left.difference_update(t.name for t, _ in group)
                if not attn_left:  # attention is final: later passes replay its output
                    self.freeze(index, self.adapter.attention(layer))
        self.layer_seconds.append(time.perf_counter() - t0)

    def _owners(self, group: list, stats) -> list[int] | None:
        """The rank that solves each target of ``group`` (distributed jobs), by estimated cost: a solve
        over a Hessian costs about out x in^2 (the sweep) + in^3 (the factorization), a data-free one
        out x in."""
        if self.parallel is None:
            return None
        costs = []
        for t, cfg in group:
            if cfg is None or self._never_called(t, cfg, stats):
                costs.append(0.0)
                continue
            w = t.weight()
            out_f, in_f = int(w.shape[0]), int(w.shape[-1])
            costs.append(float(out_f) * in_f * in_f + float(in_f) ** 3 if reads_hessian(cfg) else float(out_f) * in_f)
        return self.parallel.owners(costs)

    def _groups(self, index: int, layer: nn.Module, targets: list[Target]) -> list[list[Target]]:
        """The layer's targets in solve order: by role (q/k/v, o, gate/up, down) for an explicit adapter; in
        the execution order the runner observed, grouped by shared input, for the structural one."""
        if getattr(self.adapter, "explicit", True):
            return [[t for t in targets if t.role in roles] for roles in GROUPS]
        if not (self.true_sequential and self.input_groups is not None):
            return [targets]
        by_key: dict[str, list[Target]] = {}
        for t in targets:
            by_key.setdefault(t.stats_key, []).append(t)
        groups = []
        for keys in self.input_groups(index, layer):
            group = [t for k in keys for t in by_key.pop(k, [])]
            if group:
                groups.append(group)
        rest = [t for ts in by_key.values() for t in ts]  # never called in the traced batch
        return groups + ([rest] if rest else [])

    def _never_called(self, target: Target, cfg, stats) -> bool:
        """A structurally discovered Linear the layer never called on the calibration data has no Hessian:
        it stays dense (an explicit adapter's targets are always called; a missing Hessian is an error)."""
        if getattr(self.adapter, "explicit", True) or not reads_hessian(cfg) or stats is None:
            return False
        return f"hessian/sum/{target.stats_key}" not in stats.tensors

    @staticmethod
    def _last_reader(target: Target, later: list, stats) -> bool:
        """True when no later target of the group reads ``target``'s Hessian tensor (shared by q/k/v)."""
        if target.expert or stats is None:
            return False
        h = stats.tensors.get(f"hessian/sum/{target.stats_key}")
        return h is not None and not any(stats.tensors.get(f"hessian/sum/{t.stats_key}") is h for t, _ in later)

    def _attention_targets(self, index: int, layer: nn.Module, targets: list[Target]) -> set[str] | None:
        """Names of the targets inside the attention block (None when the layer has no such block)."""
        attn = getattr(self.adapter, "attention", None)
        try:
            attn = attn(layer) if attn is not None else None
        except AttributeError:
            return None
        path = next((n for n, m in layer.named_modules() if m is attn and n), None)
        if path is None:
            return None
        prefix = f"{self.adapter.layer_name(index)}.{path}."
        return {t.name for t in targets if t.name.startswith(prefix)} or None


__all__ = ["GROUPS", "Target", "layer_targets", "hessian_for", "solve", "reads_hessian", "LayerQuantizer"]
