"""``calibra quantize --resume``: tie the layer checkpoints (``calibra.io.checkpoint``) to the quantizer.

* :func:`open_checkpoints` -- before the model loads: the run's fingerprint (model files, settings,
  versions), refusing to resume a different run;
* :func:`restore` -- after the model loads: every finished layer's quantized tensors go back into the
  quantizer and their effective weights into the model, exactly as the interrupted run left them;
* :class:`LayerSaver` -- after each layer: commit its results and the next layer's inputs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from calibra.io.checkpoint import LayerCheckpoints, model_fingerprint, versions


def calibration_doc(calibration):
    """The calibration settings as a fingerprint entry (pre-tokenized data is named by its type: the data
    fingerprint, checked once tokens exist, identifies it)."""
    from calibra.data import CalibrationConfig

    if isinstance(calibration, CalibrationConfig):
        return dataclasses.asdict(calibration)
    if calibration is None or isinstance(calibration, (str, Path)):
        return calibration if calibration is None else str(calibration)
    return type(calibration).__name__


def _settings(config, calibration, stats, options: dict) -> dict:
    from calibra.quant.save import config_dict

    cal = calibration_doc(calibration)
    st = None
    if stats is not None:
        meta = getattr(stats, "metadata", None)
        st = meta.get("model", {}).get("id") if isinstance(meta, dict) else str(stats)
    return {
        "quantization": config_dict(config),
        "calibration": cal,
        "stats": st,
        **{
            k: (str(v) if v is not None and not isinstance(v, (bool, int, float, str, list, dict)) else v)
            for k, v in sorted(options.items())
        },
    }


def open_checkpoints(
    model, output, config, calibration, stats, *, resume: bool, overwrite: bool, options: dict, echo
) -> LayerCheckpoints:
    fp = {
        "model": model_fingerprint(model),
        "config": _settings(config, calibration, stats, options),
        "versions": versions(),
    }
    ck = LayerCheckpoints(output, fp, resume=resume, overwrite=overwrite, echo=echo, component="quantize")
    if ck.resumed_from:
        (echo or (lambda *a: None))(f"[quantize] resuming: {ck.resumed_from} finished layer(s) in {ck.folder}")
    return ck


def moe_state(runner, prefix: str) -> dict:
    """The MoE routing statistics of one layer (keys containing ``prefix``), for a checkpoint's extras."""
    moe = getattr(runner, "moe", None) if runner is not None else None
    if moe is None:
        return {}
    return {
        "moe_counts": {k: v for k, v in moe.counts.items() if prefix in k},
        "moe_blocks": {k: v for k, v in moe.blocks.items() if k.startswith(prefix)},
        "tensors": {k: v for k, v in moe.tensors.items() if prefix in k},
    }


def restore_moe(runner, extra: dict) -> None:
    """Put a checkpointed layer's MoE routing statistics (:func:`moe_state`) back into the runner."""
    moe = getattr(runner, "moe", None) if runner is not None else None
    if moe is not None:
        moe.counts.update(extra.get("moe_counts", {}))
        moe.blocks.update(extra.get("moe_blocks", {}))
        moe.tensors.update(extra.get("tensors", {}))


def restore(ck: LayerCheckpoints, quantizer, adapter, runner=None) -> int:
    """Put layers ``0 .. ck.resumed_from - 1`` back; returns that count."""
    from calibra.quant.apply import layer_targets

    for i in range(ck.resumed_from):
        layers, dense, extra = ck.load_layer(i)
        targets = {t.name: t for t in layer_targets(adapter, i, adapter.layers[i])}
        for name, ql in layers.items():
            targets[name].store(ql.dense())
        quantizer.layers.update(layers)
        quantizer.dense.extend(dense)
        quantizer.layer_seconds.append(extra.get("seconds", 0.0))
        restore_moe(runner, extra)
    return ck.resumed_from


class LayerSaverBase:
    """``after_layer(i, hidden)`` for a compressor with ``layers`` (name -> result), ``dense`` (names kept
    dense) and ``layer_seconds``: finds what layer ``i`` added and hands it to :meth:`commit`."""

    def __init__(self, ck: LayerCheckpoints, compressor, adapter, runner=None):
        self.ck, self.c, self.adapter, self.runner = ck, compressor, adapter, runner
        self.seen = set(compressor.layers)
        self.n_dense = len(compressor.dense)

    def __call__(self, i: int, hidden=None) -> None:
        new = {n: r for n, r in self.c.layers.items() if n not in self.seen}
        dense = self.c.dense[self.n_dense :]
        self.seen.update(new)
        self.n_dense = len(self.c.dense)
        extra = dict(
            moe_state(self.runner, self.adapter.layer_name(i) + "."),
            seconds=self.c.layer_seconds[-1] if self.c.layer_seconds else 0.0,
        )
        self.commit(i, new, dense, hidden, extra)

    def commit(self, i: int, new: dict, dense: list, hidden, extra: dict) -> None:  # pragma: no cover
        raise NotImplementedError


class LayerSaver(LayerSaverBase):
    """Commit layer ``i``'s new QuantizedLayers (and ``hidden``, the next layer's inputs, when calibrating)."""

    def commit(self, i: int, new: dict, dense: list, hidden, extra: dict) -> None:
        self.ck.save_layer(i, new, dense, hidden=hidden, extra=extra)


__all__ = ["open_checkpoints", "restore", "LayerSaver", "LayerSaverBase", "moe_state", "restore_moe", "calibration_doc"]
