"""The pruned-model folder: dense weights (engines dropped the compressed sparse formats, FORMATS.md 2.5),
the sparsity recorded in config.json and sparsity.json, and optionally calibra's own 2:4 form.

Layout of DIR (a plain Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads):

* ``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json`` -- every tensor, dense, under
  the names transformers saves (fused experts written back per expert), pruned weights with their zeros;
* ``config.json`` with a ``calibra_sparsity`` block ``{method, pattern, target, achieved, layers}``
  (``layers``: module -> achieved sparsity; loaders ignore unknown keys), ``generation_config.json``,
  the tokenizer files, ``README.md`` (model card);
* ``sparsity.json`` -- per pruned module: pattern, target and achieved sparsity, shape, kept count; the
  modules left dense with the reason;
* ``sparse24.safetensors`` (``save_24``, pattern 2:4 only) -- per module ``<name>.values`` ``[out, in/2]``
  and ``<name>.meta`` int16 ``[out, in/16]`` from :func:`calibra.ops.compress_24`, the input of
  calibra's 2:4 kernels; ``calibra.ops.decompress_24(values, meta)`` gives the dense weight back;
* ``calibra_manifest.json`` -- sha256 and size of every file above, settings, seed, versions;
* ``report.json`` -- the run log (settings, versions, timings, per-module log, stages, evaluation). It is
  written after the manifest and not hashed in it: its timings differ from run to run, while every
  other file is byte-identical for the same inputs and seed (FAULTS row 27).

The folder is written through ``calibra.export.writer.atomic_folder``: a temporary folder beside DIR,
renamed into place at the end, so DIR holds a complete result or nothing, and an existing DIR is
refused without ``overwrite`` (with it, replaced whole).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT = "calibra-pruned"
FORMAT_VERSION = 1
SPARSITY = "sparsity.json"
SPARSE24 = "sparse24.safetensors"
CONFIG_KEY = "calibra_sparsity"


@dataclass
class PrunedModel:
    """What the writer needs (duck-compatible with ``QuantizedModel`` where the export helpers read it)."""

    model: Any
    tokenizer: Any
    layers: dict
    """module name -> PrunedLayer (mask + log; the weight itself lives in ``model``)."""
    config: Any
    source: str
    report: dict = field(default_factory=dict)
    dense: dict = field(default_factory=dict)
    """module name -> why it was left dense."""


def module_weight(model, name: str) -> torch.Tensor:
    """The current 2-D weight of a pruned module: ``<path>.weight`` of a Linear, or the expert's slice
    ``experts.gate_up_proj[e]`` / ``experts.down_proj[e]`` of a fused 3-D parameter."""
    try:
        mod = model.get_submodule(name)
        if isinstance(getattr(mod, "weight", None), torch.Tensor):
            return mod.weight.data
    except AttributeError:
        pass
    block, rest = name.rsplit(".experts.", 1)
    e, proj = rest.split(".", 1)
    from calibra.compat.transformers import expert_slice, experts_module

    return expert_slice(experts_module(model, f"{block}.experts"), proj, int(e))


def sparsity_block(pm: PrunedModel) -> dict:
    """config.json's ``calibra_sparsity``."""
    cfg = pm.config
    total = sum(pl.mask.numel() for pl in pm.layers.values())
    kept = sum(pl.kept for pl in pm.layers.values())
    jq = cfg.quantize
    return {
        "method": cfg.method_enum.value,
        "pattern": str(cfg.pattern_obj),
        "target": cfg.sparsity,
        "achieved": 1.0 - kept / total if total else 0.0,
        "layers": {n: pm.layers[n].achieved_sparsity for n in sorted(pm.layers)},
        "dense_layers": sorted(pm.dense),
        "quantization": None
        if jq is None
        else {"bits": jq.bits, "group_size": jq.group_size, "sym": jq.sym, "stored": "dequantized (dense)"},
    }


def sparsity_doc(pm: PrunedModel) -> dict:
    """sparsity.json."""
    mods = {}
    for n in sorted(pm.layers):
        pl = pm.layers[n]
        mods[n] = {
            "pattern": pl.pattern,
            "method": pl.method,
            "target_sparsity": pl.target_sparsity,
            "achieved_sparsity": pl.achieved_sparsity,
            "shape": list(pl.mask.shape),
            "kept": pl.kept,
            "expert": bool(pl.extra.get("expert", False)),
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **{k: v for k, v in sparsity_block(pm).items() if k != "layers"},
        "modules": mods,
        "dense_modules": dict(sorted(pm.dense.items())),
    }


def tensors_24(pm: PrunedModel) -> dict[str, torch.Tensor]:
    """``<name>.values`` / ``<name>.meta`` of every pruned module (pattern 2:4)."""
    from calibra.ops import compress_24

    out = {}
    for n in sorted(pm.layers):
        if pm.layers[n].pattern != "2:4":
            raise ValueError(
                f"[prune] {n} was pruned with pattern {pm.layers[n].pattern}; the compressed 2:4 form needs pattern 2:4"
            )
        values, meta = compress_24(module_weight(pm.model, n).detach().cpu().contiguous())
        out[f"{n}.values"], out[f"{n}.meta"] = values.contiguous(), meta.contiguous()
    return out


def _settings(pm: PrunedModel) -> dict:
    from calibra.export.writer import settings_of

    return {
        f"prune_{k}": v for k, v in settings_of(pm).items() if not isinstance(v, dict) and k not in ("calibration",)
    }


def write(
    pm: PrunedModel,
    path,
    *,
    overwrite: bool = False,
    save_24: bool = False,
    report: dict | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write DIR atomically (see the module docstring); returns its path."""
    from calibra.export import _common, writer

    target = writer.check_target(path, overwrite, tag="prune")
    with writer.atomic_folder(target, overwrite=overwrite) as tmp:
        write_files(tmp, pm, _common.dense_state(pm), save_24=save_24, report=report, max_shard_bytes=max_shard_bytes)
    return target


def write_files(
    tmp: Path,
    pm: PrunedModel,
    tensors: dict | None,
    *,
    save_24: bool = False,
    report: dict | None = None,
    max_shard_bytes: int | None = None,
) -> None:
    """Everything of the folder into ``tmp``; ``tensors`` None: the shards are there already (a streamed
    job wrote them layer by layer)."""
    from safetensors.torch import save_file

    from calibra.export import _common, writer

    block = sparsity_block(pm)
    body = (
        f"Pruned with calibra: {block['method']}, pattern {block['pattern']}, achieved sparsity "
        f"{block['achieved']:.4f} over {len(pm.layers)} modules. The weights are stored dense (zeros included); "
        f"per-module sparsity is in sparsity.json and config.json's `{CONFIG_KEY}`."
    )
    _common.write_hf_folder(
        tmp,
        pm,
        tensors,
        config_updates={CONFIG_KEY: block},
        config_drop=("quantization_config",),
        max_shard_bytes=max_shard_bytes,
        card={
            "title": f"{pm.source} (pruned, {block['pattern']})",
            "library_name": "transformers",
            "tags": ["calibra", "pruned", "sparse"],
            "settings": _settings(pm),
            "body": body,
        },
    )
    writer.write_json(tmp / SPARSITY, sparsity_doc(pm))
    if save_24:
        save_file(tensors_24(pm), str(tmp / SPARSE24), metadata={"format": "calibra-sparse24"})
    writer.write_manifest(tmp, format=FORMAT, qmodel=pm)
    if report is not None:
        write_report(tmp, report)


def write_report(tmp: Path, report: dict) -> None:
    """report.html and report.json into the folder being written."""
    from calibra.export import writer
    from calibra.report import write_report_html  # before report.json: it adds the measured peaks

    write_report_html(tmp, report)
    writer.write_json(tmp / "report.json", report)


def load_24(path) -> dict[str, torch.Tensor]:
    """The dense weights of ``DIR/sparse24.safetensors``: module name -> ``decompress_24(values, meta)``."""
    from safetensors.torch import load_file

    from calibra.ops import decompress_24

    t = load_file(str(Path(path) / SPARSE24))
    names = sorted({k.rsplit(".", 1)[0] for k in t})
    return {n: decompress_24(t[f"{n}.values"], t[f"{n}.meta"]) for n in names}


__all__ = [
    "PrunedModel",
    "write",
    "module_weight",
    "sparsity_block",
    "sparsity_doc",
    "tensors_24",
    "load_24",
    "FORMAT",
    "SPARSITY",
    "SPARSE24",
    "CONFIG_KEY",
]
