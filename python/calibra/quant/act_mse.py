"""MSE-optimal clipping of static per-tensor input scales (``--act-observer mse``; ``fp8``, ``w8a8-static``).

The absmax scale never clips, but one rare large input stretches the grid for every other; a percentile
guesses how much to give up. The MSE observer **measures** it: for each quantized Linear (and each MoE
expert's projection) the candidates are ``scale(p * absmax)`` for the shrink factors ``p`` of
:data:`SHRINK_GRID` (1, 0.95, ..., 0.25), each scale computed exactly as the deployed one is
(``calibra.quant.activations.static_scale``: the model's dtype, the format's divisor), and a second pass
over the layer's calibration inputs -- the very tokens behind the absmax -- accumulates, per candidate, the
squared error ``sum (q(x; s) - x)^2`` of the format's quantize-dequantize (``fp8_fake_quant`` /
``int8_fake_quant``) in float64. The least error wins (ties: the larger scale), so the kept scale's measured
error on the calibration inputs is never above absmax's (``p = 1`` is a candidate).

The pass is ``LayerRunner.collect`` with only the error observer attached, inside the job's ``on_layer``:
the fp8 pass runs it before the layer's weights are rounded (its inputs are then exactly the ones the
ranges were collected from), the w8a8 pass after a group's solve (a group's inputs do not depend on its own
weights). Experts no token reached have no error; they keep the recorded fallback of
``calibra.quant.activations`` (the largest *clipped* range of their block's experts).

Imports ``calibra.calib`` inside :func:`choose_shrink` only (the quantizer modules import no calibration
code at import time).
"""

from __future__ import annotations

import torch

from calibra.quant.activations import _MATH, _absmax_of, static_scale

SHRINK_GRID = tuple(round(1.0 - k / 20, 2) for k in range(16))  # 1.0, 0.95, ..., 0.25


def candidate_scales(amax: torch.Tensor, dtype: torch.dtype, format: str) -> torch.Tensor:
    """The static scales ``[len(SHRINK_GRID)]`` of the clipped ranges ``p * amax``."""
    return torch.cat([static_scale(amax * p, dtype, format) for p in SHRINK_GRID])


def _observer(candidates: dict[str, torch.Tensor], format: str):
    from calibra.calib.observers import Observer

    fake_quant = _MATH[format][1]

    class ClipErrorObserver(Observer):
        """Per candidate scale of a key, the float64 sum of squared quantization errors of its inputs."""

        kind = "act_clip_error"

        def linear(self, key: str, x: torch.Tensor) -> None:
            scales = candidates.get(key)
            if scales is None or x.shape[0] == 0:
                return
            s, xd = scales.to(x.device), x.double()
            err = torch.stack([(fake_quant(x, s[k : k + 1]).double() - xd).pow(2).sum() for k in range(s.numel())])
            name = f"{self.kind}/sum/{key}"
            self.tensors[name] = err if name not in self.tensors else self.tensors[name] + err
            self._count(key, x.shape[0])

    return ClipErrorObserver()


def choose_shrink(runner, index: int, layer, stats, targets, dtype: torch.dtype, format: str, modules=None):
    """``{stats key: kept shrink factor}`` of ``targets`` with calibration tokens in ``stats`` (with the
    ``ranges`` observer), measured by one pass of ``runner`` over layer ``index`` (``modules``: the keys to
    run, default the whole layer), and ``{stats key: {p: error}}`` for the report."""
    candidates = {}
    for t in targets:
        amax = _absmax_of(stats, t.stats_key)
        if amax is not None:
            candidates[t.stats_key] = candidate_scales(amax, dtype, format)
    if not candidates:
        return {}, {}
    obs = _observer(candidates, format)
    saved = runner.observers
    runner.observers = [obs]  # only the error pass: the other statistics of the layer stay as they are
    try:
        runner.collect(index, layer, modules)
    finally:
        runner.observers = saved
    kept, errors = {}, {}
    for key in candidates:
        err = obs.tensors.get(f"{obs.kind}/sum/{key}")
        if err is None:  # the pass saw no token of it (cannot happen when the ranges did): keep absmax
            continue
        best = int(torch.argmin(err))  # the first minimum: the largest scale on a tie
        kept[key] = SHRINK_GRID[best]
        errors[key] = {f"{p:g}": float(e) for p, e in zip(SHRINK_GRID, err.tolist())}
    return kept, errors


__all__ = ["SHRINK_GRID", "candidate_scales", "choose_shrink"]
