"""``calibra prune --resume``: the layer checkpoints (``calibra.io.checkpoint``) tied to the pruner, as
``calibra.quant.resume`` ties them to the quantizer (FAULTS rows 22-24).

Per finished layer the checkpoint holds, for every pruned module, its pruned weight (exactly what the
model holds, in the model's dtype) and its keep-mask, plus the :class:`~calibra.prune.result.PrunedLayer`
log fields; the modules left dense, the layer's MoE routing statistics and the next layer's inputs
(data-driven methods) come with it. A resumed run puts the finished layers' weights back into the model
and continues with the next layer from the stored inputs, so it writes the same bytes as an
uninterrupted run.
"""

from __future__ import annotations

from calibra.io.checkpoint import LayerCheckpoints, model_fingerprint, versions
from calibra.quant.resume import LayerSaverBase, calibration_doc, restore_moe

# PrunedLayer fields kept as JSON (the tensors -- weight, mask -- go to the safetensors file; the joint
# quantization's tensors are not kept after a layer: its log records the settings)
_LOG_FIELDS = (
    "name",
    "method",
    "pattern",
    "target_sparsity",
    "achieved_sparsity",
    "reconstruction_error",
    "seconds",
    "damp",
    "dead_channels",
    "extra",
)


def open_checkpoints(
    model, output, config, calibration, *, resume: bool, overwrite: bool, options: dict, echo
) -> LayerCheckpoints:
    """The run's checkpoint folder, checked against its fingerprint (model files, settings, versions)."""
    from calibra.prune.config import config_dict

    doc = dict(config_dict(config), calibration=None)  # the calibration is fingerprinted by itself (and the data)
    settings = {
        "pruning": doc,
        "calibration": calibration_doc(calibration),
        **{
            k: (v if v is None or isinstance(v, (bool, int, float, str)) else str(v))
            for k, v in sorted(options.items())
        },
    }
    fp = {"model": model_fingerprint(model), "config": settings, "versions": versions()}
    ck = LayerCheckpoints(output, fp, resume=resume, overwrite=overwrite, echo=echo, component="prune")
    if ck.resumed_from:
        (echo or (lambda *a: None))(f"[prune] resuming: {ck.resumed_from} finished layer(s) in {ck.folder}")
    return ck


def _targets(adapter, i: int) -> dict:
    from calibra.quant.apply import layer_targets

    return {t.name: t for t in layer_targets(adapter, i, adapter.layers[i])}


def restore(ck: LayerCheckpoints, pruner, adapter, runner=None) -> int:
    """Put layers ``0 .. ck.resumed_from - 1`` back into the model and the pruner; returns that count."""
    import torch

    from calibra.prune.result import PrunedLayer

    for i in range(ck.resumed_from):
        _, dense, extra = ck.load_layer(i)
        tensors = extra.pop("tensors", {})
        targets = _targets(adapter, i)
        for name, log in extra.pop("pruned", {}).items():
            w = tensors[f"pruned/{name}/weight"]
            targets[name].store(w.to(targets[name].weight().dtype))
            pl = PrunedLayer(weight=None, mask=tensors[f"pruned/{name}/mask"].to(torch.bool), **log)
            pruner.layers[name] = pl
        pruner.dense.extend(dense)
        pruner.layer_seconds.append(extra.get("seconds", 0.0))
        restore_moe(runner, dict(extra, tensors={k: v for k, v in tensors.items() if not k.startswith("pruned/")}))
    return ck.resumed_from


class LayerSaver(LayerSaverBase):
    """Commit layer ``i``'s pruned modules (their weights as the model now holds them, and masks), the
    modules left dense and, when calibrating, the next layer's inputs."""

    def commit(self, i: int, new: dict, dense: list, hidden, extra: dict) -> None:
        targets = _targets(self.adapter, i)
        tensors = dict(extra.pop("tensors", {}))
        for name, pl in new.items():
            tensors[f"pruned/{name}/weight"] = (
                targets[name].weight().detach().cpu().clone()
            )  # an expert slice is a view
            tensors[f"pruned/{name}/mask"] = pl.mask.cpu().clone()
        extra.update(tensors=tensors, pruned={n: {f: getattr(pl, f) for f in _LOG_FIELDS} for n, pl in new.items()})
        self.ck.save_layer(i, {}, dense, hidden=hidden, extra=extra)


__all__ = ["open_checkpoints", "restore", "LayerSaver"]
