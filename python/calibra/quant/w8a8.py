"""The INT8 W8A8 job (``--scheme w8a8`` / ``w8a8-static``), and the W4A4 jobs with GPTQ weights
(``--scheme nvfp4`` / ``mxfp4`` with a GPTQConfig: the same pass without smoothing, their input format
instead of int8): one calibration pass that, layer by layer and group by group (q/k/v, o, gate/up, down:
GPTQ's true-sequential order),

1. for a smoothing group (``act_ranges.smoothing_groups``), collects the group's input ranges and a sample
   of its inputs, searches the SmoothQuant strength (``calibra.quant.smoothquant``) and folds the kept
   factors into the norm and the group's weights;
2. collects the group's Hessians (and input ranges) from the layer as it is now -- smoothed, the earlier
   groups quantized and their inputs simulated -- so GPTQ solves on the smoothed inputs' Hessian
   ``diag(1/s) H diag(1/s)`` (measured, not transformed);
3. solves the group's int8 weights with GPTQ (``LayerQuantizer``);
4. fixes the group's input quantization (per token, or a static scale from the ranges just collected)
   and installs its simulation before the next group is collected, so every later statistic is what the
   deployed model computes.

Imports ``calibra.calib`` inside :func:`run` only (the quantizer modules import no calibration code).
"""

from __future__ import annotations

import math

import torch

from calibra.quant import act_ranges as ar
from calibra.quant import activations
from calibra.quant import smoothquant as sq
from calibra.quant.apply import layer_targets


class W8A8Layers:
    """The runner's ``on_layer`` callback (see the module docstring). ``runner``: the ``LayerRunner`` (made
    with ``collect_on_demand=True``); ``quantizer``: a ``LayerQuantizer`` with the scheme's GPTQConfig;
    ``act``: the ``ActQuantConfig``; ``smooth``: the ``SmoothConfig`` (None: no smoothing groups at all, the
    W4A4 schemes); ``total_tokens``: unpadded calibration tokens (the sample's stride)."""

    def __init__(self, model, adapter, quantizer, runner, act, smooth, total_tokens: int):
        self.model, self.adapter, self.quantizer, self.runner = model, adapter, quantizer, runner
        self.act, self.smooth = act, smooth
        self.stride = max(1, math.ceil(total_tokens / smooth.sample_tokens)) if smooth is not None else 1
        self.dtype = next(model.parameters()).dtype
        self.input_quant: dict = {}
        self.smoothing: dict = {}  # norm path -> what the search measured and kept
        self._groups: dict = {}
        self._pending: list[str] = []
        self._stats = None
        quantizer.collect, quantizer.freeze = self._collect, runner.freeze
        quantizer.input_groups = runner.input_groups
        quantizer.on_module = lambda ql: self._pending.append(ql.name)

    def __call__(self, index: int, layer, stats) -> None:
        groups = ar.smoothing_groups(self.adapter, index, layer) if self.smooth is not None else []
        self._groups = {frozenset(mods): (norm, mods) for norm, _, mods in groups}
        self._stats = stats
        self.quantizer(index, layer, stats)
        self._finish(index, layer)

    # -- one group ----------------------------------------------------------------------------------
    def _collect(self, index: int, layer, keys):
        self._finish(index, layer)  # the previous group's inputs are simulated from here on
        group = self._groups.get(frozenset(keys))
        if group is not None:
            self._smooth(index, layer, list(keys), *group)
        self._stats = self.runner.collect(index, layer, keys)
        return self._stats

    def _smooth(self, index: int, layer, keys: list[str], norm: str, mods: dict) -> None:
        mask_of = lambda: self.runner.token_mask  # noqa: E731
        rows: list[torch.Tensor] = []
        seen = [0]

        def sample(module, args):
            x = args[0]
            m = mask_of()
            xs = (
                x[m]
                if m is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(m.shape)
                else x.reshape(-1, x.shape[-1])
            )
            # every stride-th token of the whole calibration set, wherever batch boundaries fall
            first = (-seen[0]) % self.stride
            rows.append(xs[first :: self.stride].detach().float().cpu())
            seen[0] += xs.shape[0]

        first_mod = mods[keys[0]] if keys[0] in mods else next(iter(mods.values()))
        handle = first_mod.register_forward_pre_hook(sample)
        try:
            stats = self.runner.collect(index, layer, keys) if self.smooth.mode != "off" else None
        finally:
            handle.remove()
        if stats is None:
            self.smoothing[norm] = {"alpha": None, "modules": sorted(mods)}
            return
        key = next(iter(mods))
        amax = torch.maximum(stats.tensors[f"ranges/min/{key}"].abs(), stats.tensors[f"ranges/max/{key}"].abs())
        weights = torch.cat([m.weight.detach().float() for m in mods.values()], 0)
        clip = self.act.clip_percentile if (not self.act.dynamic and self.act.observer == "percentile") else None
        # the candidates' weights as the job solves them: GPTQ on each candidate's smoothed Hessian
        dev = weights.device  # the layer's compute device: 12 GPTQ solves per group
        hessian = (stats.tensors[f"hessian/sum/{key}"].to(dev), stats.count("hessian", key))
        alpha, s, errors = sq.search(
            torch.cat(rows).to(dev), amax.float().to(dev), weights, self.smooth, dynamic=self.act.dynamic,
            clip_percentile=clip, hessian=hessian, gptq=self.quantizer.config,
        )  # fmt: skip
        s = None if s is None else s.cpu()
        entry = {
            "alpha": alpha,
            "modules": sorted(mods),
            "errors": errors,
            "sample_tokens": int(sum(len(r) for r in rows)),
        }
        if s is not None:
            ar.apply_smoothing({"smooth_factor": {norm: {"modules": list(mods), "scales": s.tolist()}}}, self.model)
            entry["max_factor"], entry["min_factor"] = float(s.max()), float(s.min())
        self.smoothing[norm] = entry

    def _finish(self, index: int, layer) -> None:
        """Fix and simulate the input quantization of the modules solved since the last call."""
        if not self._pending:
            return
        names = set(self._pending)
        self._pending = []
        fmt = self.act.format
        if self.act.dynamic:
            new = activations.dynamic_input_quant(sorted(names), format=fmt)
        else:
            targets = [t for t in layer_targets(self.adapter, index, layer) if t.name in names]
            clip = self.act.clip_percentile if self.act.observer == "percentile" else None
            shrink = None
            if self.act.observer == "mse":  # a group's inputs do not depend on its own (now solved) weights
                from calibra.quant.act_mse import choose_shrink

                keys = sorted({t.stats_key for t in targets})
                shrink, _ = choose_shrink(self.runner, index, layer, self._stats, targets, self.dtype, fmt, keys)
            new = activations.static_input_quant(self._stats, targets, self.dtype, clip, format=fmt, shrink=shrink)
        self.input_quant.update(new)
        activations.install(self.model, self.input_quant)

    def report(self, smooth) -> dict | None:
        if smooth is None:
            return None
        kept = [e["alpha"] for e in self.smoothing.values()]
        return {
            **smooth.to_dict(),
            "smoothed_groups": sum(a is not None for a in kept),
            "groups": dict(sorted(self.smoothing.items())),
        }


def run(model, adapter, quantizer, ids, mask, bs, run_meta, device, progress, act, smooth):
    """The W8A8 calibration pass (module docstring). Returns ``({module: InputQuant}, final statistics,
    the report's smoothing block or None without smoothing)``."""
    from calibra.calib import LayerRunner

    runner = LayerRunner(
        model,
        adapter,
        device=device,
        observers=("hessian", "ranges"),
        feed_compressed=True,
        collect_on_demand=True,
        on_layer=lambda *a: None,  # replaced below (the callback needs the runner)
        progress=progress,
        desc=f"w8a8 (smoothquant {smooth.mode}) + gptq" if smooth is not None else f"{act.format} inputs + gptq",
        keep_layer_stats=False,
    )
    total = int(mask.sum()) if mask is not None else int(ids.numel())
    cb = W8A8Layers(model, adapter, quantizer, runner, act, smooth, total)
    runner.on_layer = cb
    final = runner.run(ids, mask, batch_size=bs, extra_metadata={"runs": [run_meta]})
    return cb.input_quant, final, cb.report(smooth)


__all__ = ["W8A8Layers", "run"]
