"""calibra's own quantized-model folder (until an engine format is asked for through the exporters).

Layout of DIR:

* ``quantized.safetensors`` -- for every quantized weight ``<name>``: ``<name>.codes`` (uint8, one code
  per weight), ``<name>.scales``, ``<name>.zeros`` (int formats), ``<name>.g_idx`` (act-order with
  dynamic groups), ``<name>.global_scale`` (FP4); plus every tensor of the model that was not quantized
  (embeddings, norms, lm_head, routers, dense modules) under its state-dict name. A fused-expert 3-D
  parameter is stored whole only when some of its experts stayed dense; quantized slices override it.
  A streamed job (a model larger than memory, ``calibra.export.streamed``) writes the same tensors as
  ``quantized-0000k-of-0000N.safetensors`` shards (one per decoder layer, then the rest; dense tensors at
  their stored dtype) with ``quantized.safetensors.index.json``.
* ``quantization.json`` -- format/version, the config, and per module: method, format, bits, group
  size, symmetric, rotation, shape;
* ``config.json`` and the tokenizer files; ``report.json`` (written by the API).

Everything is written into a temporary folder beside DIR and renamed into place at the end, so DIR
either holds a complete result or nothing (an existing DIR is refused without ``overwrite`` and, with
it, replaced whole). Tensors and JSON are written in sorted order, so the same inputs give the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

FORMAT = "calibra-quantized"
FORMAT_VERSION = 1
WEIGHTS = "quantized.safetensors"
MANIFEST = "quantization.json"
INDEX = "quantized.safetensors.index.json"
"""A streamed job writes ``quantized-0000k-of-0000N.safetensors`` shards and this index instead of WEIGHTS."""


def config_dict(config) -> dict:
    d = dataclasses.asdict(config)
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    if not d.get("awq", True):  # absent means off: a job without AWQ writes the manifest it always wrote
        d.pop("awq")
        d.pop("awq_grid", None)
    if not d.get("gptaq", True):  # the same for GPTAQ
        d.pop("gptaq")
        d.pop("gptaq_alpha", None)
        d.pop("gptaq_choose", None)
    if not d.get("choose_clip", True):  # the same for the clip choice
        d.pop("choose_clip")
    return {"method": config.method, **d}


def _quantized_params(qm) -> tuple[set, dict]:
    """(state-dict names of 2-D weights fully replaced by codes, {fused param name: (set of expert indices,
    number of experts)}) -- a fused param is the 3-D ``gate_up_proj`` / ``down_proj`` or, for DBRX, the 2-D
    ``mlp.w1`` / ``mlp.v1`` / ``mlp.w2`` holding every expert's rows (``compat.transformers.expert_params``)."""
    from calibra.compat.transformers import expert_params, experts_module, fused_expert_count

    full, slices = set(), {}
    for name in qm.layers:
        if ".experts." in name and (name.endswith(".gate_up_proj") or name.endswith(".down_proj")):
            block, rest = name.rsplit(".experts.", 1)
            e, proj = rest.split(".", 1)
            experts = experts_module(qm.model, f"{block}.experts")
            for p in expert_params(experts, proj):
                seen, _ = slices.setdefault(f"{block}.experts.{p}", (set(), fused_expert_count(experts)))
                seen.add(int(e))
        else:
            full.add(f"{name}.weight")
    return full, slices


def layer_tensors(name: str, ql) -> dict[str, torch.Tensor]:
    """The tensors of one quantized weight in this folder's layout."""
    fields = ("codes", "scales", "zeros", "g_idx", "global_scale")
    return {f"{name}.{f}": getattr(ql, f) for f in fields if getattr(ql, f) is not None}


def tensors_of(qm) -> dict[str, torch.Tensor]:
    """Every tensor of ``quantized.safetensors`` (see the module docstring)."""
    out = {}
    for name, ql in qm.layers.items():
        out.update(layer_tensors(name, ql))
    full, slices = _quantized_params(qm)
    seen = set()
    for k, v in qm.model.state_dict().items():
        if k in full:
            continue
        if k in slices and len(slices[k][0]) == slices[k][1]:
            continue
        key = (v.data_ptr(), tuple(v.shape))
        if key in seen:  # tied weights: stored once (config.json says they are tied)
            continue
        seen.add(key)
        out[k] = v
    return {k: out[k].detach().cpu().contiguous() for k in sorted(out)}


def manifest(qm) -> dict:
    mods = {}
    for name in sorted(qm.layers):
        ql = qm.layers[name]
        mods[name] = {
            "method": ql.method,
            "format": ql.format,
            "bits": ql.bits,
            "group_size": ql.group_size,
            "symmetric": ql.symmetric,
            "shape": list(ql.codes.shape),
            "g_idx": ql.g_idx is not None,
            "rotation": ql.rotation,
            "dtype": str(ql.weight.dtype).replace("torch.", ""),
        }
        if ql.log.choice is not None:  # MR-GPTQ's per-layer choice (the report row has every candidate's error)
            mods[name]["choice"] = ql.log.choice["kept"]
    extra = qm.report.get("quantization", {})
    out = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config_dict(qm.config),
        "modules": mods,
        "dense_modules": sorted(extra.get("dense_modules", [])),
        "smoothed_modules": sorted(extra.get("smoothed_modules", [])),
    }
    # activation-quantized schemes and the FP8 KV cache (absent otherwise: weight-only folders are unchanged)
    if getattr(qm, "input_quant", None) is not None:
        out["activations"] = {
            "scheme": qm.scheme,
            "modules": {n: iq.to_dict() for n, iq in sorted(qm.input_quant.items())},
        }
    if getattr(qm, "kv_scales", None) is not None:
        from calibra.models import get_adapter
        from calibra.quant.kv_fp8 import scales_to_dict

        out["kv_cache"] = {"format": "fp8", "scales": scales_to_dict(get_adapter(qm.model), qm.kv_scales)}
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")


def write(qm, path, *, overwrite: bool = False, report: dict | None = None, extra_files: dict | None = None) -> Path:
    """Write the folder atomically (see the module docstring). ``extra_files``: name -> JSON object.

    Through ``calibra.export.writer.atomic_folder`` like every export: a temporary folder beside DIR,
    renamed at the end; disk full or any error removes it and leaves an earlier DIR intact; stale
    temporary folders of killed runs are removed. ``calibra_manifest.json`` hashes every file except
    report.json (its timings differ from run to run; everything else is byte-identical for the same
    inputs and seed)."""
    from safetensors.torch import save_file

    from calibra.export import writer

    path = writer.check_target(path, overwrite, tag="quantize")
    with writer.atomic_folder(path, overwrite=overwrite) as tmp:
        save_file(tensors_of(qm), str(tmp / WEIGHTS), metadata={"format": FORMAT})
        write_files(tmp, qm, report=report, extra_files=extra_files)
    return path


def write_files(folder: Path, qm, *, report: dict | None = None, extra_files: dict | None = None) -> None:
    """Everything of the folder but the tensors: quantization.json, config.json, the tokenizer, the extra
    JSON files, the manifest (hashing all of them and the tensors already there), report.json."""
    from calibra.export import writer

    _write_json(folder / MANIFEST, manifest(qm))
    qm.model.config.to_json_file(str(folder / "config.json"), use_diff=False)
    if qm.tokenizer is not None:
        qm.tokenizer.save_pretrained(str(folder))
    for name, obj in (extra_files or {}).items():
        _write_json(folder / name, obj)
    writer.write_manifest(folder, format=FORMAT, qmodel=qm)
    if report is not None:
        from calibra.report import write_report_html  # before report.json: it adds the measured peaks

        write_report_html(folder, report)
        _write_json(folder / "report.json", report)


def load(path, dtype=torch.float32):
    """Rebuild the simulated quantized model from a folder written by :func:`write`: the model from
    config.json, non-quantized tensors as stored, every quantized weight dequantized from its codes.
    Returns ``(model, manifest)``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from calibra.models.linear import store_weight

    path = Path(path)
    man = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    if man.get("format") != FORMAT:
        raise ValueError(
            f"[quantize] {path} is not a calibra quantized folder ({MANIFEST} format {man.get('format')!r})"
        )
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    if (path / WEIGHTS).exists():
        tensors = load_file(str(path / WEIGHTS))
    else:  # a streamed job's shards (calibra.export.streamed)
        index = json.loads((path / INDEX).read_text(encoding="utf-8"))
        tensors = {}
        for fname in sorted(set(index["weight_map"].values())):
            tensors.update(load_file(str(path / fname)))
    quant_keys = quant_keys_of(man)
    sd = {k: v for k, v in tensors.items() if k not in quant_keys}
    missing, _ = model.load_state_dict(sd, strict=False)
    params = dict(model.named_parameters())
    for name, info in man["modules"].items():
        w = dequantize_module(tensors, name, info)
        if f"{name}.weight" in params:
            store_weight(model.get_submodule(name), w.to(dtype))  # [in, out] for a GPT-2 Conv1D
            continue
        block, rest = name.rsplit(".experts.", 1)
        e, proj = rest.split(".", 1)
        from calibra.compat.transformers import experts_module, store_expert_slice

        store_expert_slice(experts_module(model, f"{block}.experts"), proj, int(e), w.to(dtype))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    simulate(model, man, dtype)
    return model, man


def simulate(model, man: dict, dtype) -> None:
    """Install the hooks that quantize inputs and the KV cache as the manifest says (nothing for a
    weight-only folder), so the loaded model computes what the engine will."""
    if "activations" in man:
        from calibra.quant import activations

        activations.install(
            model,
            {n: activations.InputQuant.from_dict(d, dtype) for n, d in man["activations"]["modules"].items()},
        )
    if "kv_cache" in man:
        from calibra.models import get_adapter
        from calibra.quant import kv_fp8

        adapter = get_adapter(model)
        kv_fp8.install(model, adapter, kv_fp8.scales_from_dict(adapter, man["kv_cache"]["scales"], dtype))


def quant_keys_of(man: dict) -> set[str]:
    return {f"{m}.{f}" for m in man["modules"] for f in ("codes", "scales", "zeros", "g_idx", "global_scale")}


def dequantize_module(tensors, name: str, info: dict) -> torch.Tensor:
    """The weight of quantized module ``name`` in the model's own input space (rotated back when it was
    rotated), from its fields in ``tensors`` (a mapping: ``[key]`` and ``.get(key)``) and its manifest entry."""
    w = _dequantize(tensors, name, info)
    if info["rotation"] is not None:
        from calibra.ops import hadamard

        w = hadamard(w.float(), info["rotation"]["block_size"])
    return w


def _dequantize(tensors, name: str, info: dict) -> torch.Tensor:
    from calibra.quant.result import QuantizedLayer

    get = tensors.get
    codes = tensors[f"{name}.codes"]
    ql = QuantizedLayer(
        name=name,
        method=info["method"],
        format=info["format"],
        bits=info["bits"],
        group_size=info["group_size"],
        symmetric=info["symmetric"],
        codes=codes,
        scales=tensors[f"{name}.scales"],
        zeros=get(f"{name}.zeros"),
        g_idx=get(f"{name}.g_idx"),
        global_scale=get(f"{name}.global_scale"),
        weight=torch.empty(0, dtype=getattr(torch, info["dtype"])),
        rotation=None,
        log=None,
    )
    return ql.dequantize()


__all__ = [
    "write",
    "write_files",
    "layer_tensors",
    "load",
    "dequantize_module",
    "tensors_of",
    "manifest",
    "FORMAT",
    "WEIGHTS",
    "MANIFEST",
]
