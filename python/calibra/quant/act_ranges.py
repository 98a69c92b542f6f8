"""Activation ranges for RTN: per-module percentile ranges and SmoothQuant-style smoothing factors,
written as ``activation_ranges.json`` and accepted back as a calibration input.

File format (JSON)::

    {"format": "calibra-activation-ranges", "format_version": 1,
     "percentile": 99.9,                   # p_hi is the 99.9th percentile, p_lo the 0.1th
     "alpha": 0.5,                         # SmoothQuant migration strength
     "layer_ranges": {module: {"min", "max", "p_lo", "p_hi", "tokens"}},
     "smooth_factor": {norm: {"modules": [Linear paths], "scales": [s_j per input channel]}}}

Smoothing (Xiao et al., 2023, SmoothQuant): ``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)``, with
``max|W_:,j|`` over every Linear reading the same input. ``y = W x = (W diag(s)) (x / s)``: the columns of
W are multiplied by ``s`` before RTN and ``x / s`` is folded into the RMSNorm that produces ``x``
(``norm.weight /= s``), so the smoothed model needs no extra operation at inference and every exporter
writes it as an ordinary model (norm weights included). Only inputs produced by a foldable norm are
smoothed: q/k/v (``input_layernorm``) and the dense MLP's gate/up (``post_attention_layernorm``).
o_proj, down_proj and MoE experts (whose norm also feeds the router) are left unsmoothed, and so is every
family without an explicit adapter (its norms' layout is not known: Gemma scales by ``1 + w``); the file
says which modules were smoothed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

FORMAT = "calibra-activation-ranges"
DEFAULT_PERCENTILE = 99.9
DEFAULT_ALPHA = 0.5


def smoothing_groups(adapter, index: int, layer) -> list[tuple[str, torch.nn.Module, dict]]:
    """``(norm path, norm module, {Linear path: Linear})`` for the inputs of layer ``index`` that a norm
    produces and that feed only Linears (see the module docstring)."""
    if not getattr(adapter, "explicit", True):
        # a structurally discovered family's norms may not divide like an RMSNorm weight (Gemma's (1 + w),
        # a LayerNorm's bias, a norm that also feeds a router): smoothing folds only into known layouts
        return []
    lname = adapter.layer_name(index)
    lin = adapter.linear_modules(layer)
    out = []
    attn = {
        n: m
        for n, m in lin.items()
        if n.startswith("self_attn.") and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")
    }
    norm = getattr(layer, "input_layernorm", None)
    if norm is not None and len(attn) == 3:
        out.append((f"{lname}.input_layernorm", norm, {f"{lname}.{n}": m for n, m in attn.items()}))
    mlp = {n: m for n, m in lin.items() if n in ("mlp.gate_proj", "mlp.up_proj")}
    norm = getattr(layer, "post_attention_layernorm", None)
    if norm is not None and len(mlp) == 2 and not adapter.moe_blocks(layer):
        out.append((f"{lname}.post_attention_layernorm", norm, {f"{lname}.{n}": m for n, m in mlp.items()}))
    return out


def build(stats, model, adapter, *, percentile: float = DEFAULT_PERCENTILE, alpha: float = DEFAULT_ALPHA) -> dict:
    """The activation-ranges document from a calibration with the ``ranges`` observer."""
    check_settings(percentile, alpha)
    smooth = {}
    for i, layer in enumerate(adapter.layers):
        smooth.update(layer_smoothing(stats, adapter, i, layer, alpha))
    return document(module_ranges(stats, percentile), smooth, percentile, alpha)


def check_settings(percentile: float, alpha: float) -> None:
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"[quantize] act-range percentile must be in (50, 100], got {percentile}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"[quantize] smoothing alpha must be in [0, 1], got {alpha}")


def module_ranges(stats, percentile: float) -> dict:
    """``layer_ranges`` of the document: every module of ``stats`` with a ``ranges`` statistic."""
    from calibra.calib.observers import percentile as pct

    ranges = {}
    for m in stats.modules("ranges"):
        hist = stats.tensors[f"ranges/hist/{m}"]
        ranges[m] = {
            "min": float(stats.tensors[f"ranges/min/{m}"].min()),
            "max": float(stats.tensors[f"ranges/max/{m}"].max()),
            "p_lo": pct(hist, 100.0 - percentile),
            "p_hi": pct(hist, percentile),
            "tokens": stats.count("ranges", m),
        }
    return ranges


def layer_smoothing(stats, adapter, index: int, layer, alpha: float) -> dict:
    """``smooth_factor`` entries of decoder layer ``index`` (its weights loaded), from its ranges in ``stats``
    (a streamed job scores each layer while it is loaded)."""
    from calibra.calib.observers import smooth_factors

    smooth = {}
    for norm_name, _, mods in smoothing_groups(adapter, index, layer):
        first = next(iter(mods))
        act = torch.maximum(stats.tensors[f"ranges/min/{first}"].abs(), stats.tensors[f"ranges/max/{first}"].abs())
        w = torch.cat([m.weight.detach().float() for m in mods.values()], 0)
        s = smooth_factors(act, w, alpha)
        smooth[norm_name] = {"modules": list(mods), "scales": [float(v) for v in s]}
    return smooth


def document(ranges: dict, smooth: dict, percentile: float, alpha: float) -> dict:
    return {
        "format": FORMAT,
        "format_version": 1,
        "percentile": percentile,
        "alpha": alpha,
        "layer_ranges": ranges,
        "smooth_factor": smooth,
    }


def save(doc: dict, path) -> Path:
    """Write atomically (temp file beside it + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path


def is_ranges_file(source) -> bool:
    """True when ``source`` names an activation-ranges JSON file (by its content)."""
    p = Path(str(source))
    if p.suffix != ".json" or not p.is_file():
        return False
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


def load(path) -> dict:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT or "smooth_factor" not in doc or "layer_ranges" not in doc:
        raise ValueError(
            f"[quantize] {path} is not an activation_ranges.json (format {FORMAT!r} with "
            f"layer_ranges and smooth_factor)"
        )
    return doc


def apply_smoothing(doc: dict, model) -> list[str]:
    """Fold the smoothing factors into the model in place: ``norm.weight /= s`` and ``W[:, j] *= s_j``.
    Returns the smoothed Linear paths. Raises naming the module when the file does not fit the model."""
    mods = dict(model.named_modules())
    done = []
    for norm_name, entry in doc["smooth_factor"].items():
        norm = mods.get(norm_name)
        if norm is None or not hasattr(norm, "weight"):
            raise ValueError(
                f"[quantize] activation ranges name {norm_name}, which this model lacks; "
                f"calibrate the ranges on this model"
            )
        s = torch.tensor(entry["scales"], dtype=torch.float32)
        if s.numel() != norm.weight.numel() or not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
            raise ValueError(
                f"[quantize] smoothing scales of {norm_name} must be {norm.weight.numel()} positive "
                f"finite values, got {s.numel()}"
            )
        for name in entry["modules"]:
            lin = mods.get(name)
            if lin is None or lin.in_features != s.numel():
                raise ValueError(f"[quantize] activation ranges name {name}, which does not fit this model")
        with torch.no_grad():
            norm.weight.data.copy_((norm.weight.float() / s).to(norm.weight.dtype))
            for name in entry["modules"]:
                w = mods[name].weight
                w.data.copy_((w.float() * s[None, :]).to(w.dtype))
        done += list(entry["modules"])
    return done


def summary(doc: dict) -> dict:
    """Small report entry (the full file sits next to the output)."""
    his = [r["p_hi"] for r in doc["layer_ranges"].values() if not math.isnan(r["p_hi"])]
    return {
        "percentile": doc["percentile"],
        "alpha": doc["alpha"],
        "modules": len(doc["layer_ranges"]),
        "smoothed_norms": sorted(doc["smooth_factor"]),
        "max_p_hi": max(his) if his else None,
    }
