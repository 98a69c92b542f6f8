"""Readers of a written pruned folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

REPORT_KEYS = {
    "format",
    "format_version",
    "model",
    "settings",
    "versions",
    "seed",
    "summary",
    "modules",
    "sparsity",
    "timings",
    "stages",
}
MODULE_KEYS = {
    "module",
    "method",
    "pattern",
    "target_sparsity",
    "achieved_sparsity",
    "reconstruction_error",
    "seconds",
    "weight_error",
}


def read_report(folder) -> dict:
    return json.loads((Path(folder) / "report.json").read_text(encoding="utf-8"))


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for p in sorted(Path(folder).glob("model-*.safetensors")):
        out.update(load_file(str(p)))
    return out


def reload(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()


def weight_of(model, name: str) -> torch.Tensor:
    from calibra.prune.save import module_weight

    return module_weight(model, name)


def folder_bytes(folder, skip=("report.json", "report.html")) -> dict[str, bytes]:  # both carry timings
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }
