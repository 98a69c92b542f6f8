"""``calibra inspect DIR``: what a checkpoint folder (or a .gguf file) holds, and whether its files
still match the manifest.

Detects compressed-tensors (pack-quantized / nvfp4), GPTQ (v1 / v2, act-order), MLX affine, GGUF
and dense Hugging Face checkpoints; reports bits, group size, symmetry, the sparsity of dense Linear
weights (fraction of exact zeros), file sizes and the producer (calibra's manifest, or the
quantizer named in the config). ``verify=True`` re-hashes every file listed in
calibra_manifest.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from calibra.export.writer import MANIFEST, verify_manifest

_NORM_OR_EMBED = ("norm", "embed", "lm_head")


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _sparsity(folder: Path) -> dict:
    """Fraction of exact zeros over the 2-D float ``*.weight`` tensors of Linear layers."""
    from safetensors import safe_open

    zeros = total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                if not k.endswith(".weight") or any(s in k for s in _NORM_OR_EMBED):
                    continue
                t = sf.get_tensor(k)
                if t.dim() != 2 or not t.is_floating_point():
                    continue
                zeros += int((t == 0).sum())
                total += t.numel()
    return {"linear_weights": total, "sparsity": (zeros / total) if total else 0.0}


def _gguf_info(path: Path) -> dict:
    try:
        import gguf
    except ImportError:
        return {"format": "gguf", "note": "install gguf (pip install 'calibra[gguf]') for details"}
    r = gguf.GGUFReader(str(path))
    counts: dict[str, int] = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    arch = r.fields.get("general.architecture")
    arch = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else None
    quant = sorted(k for k in counts if k.startswith("Q"))
    bits = {"Q4_0": 4, "Q8_0": 8}.get(quant[0]) if len(quant) == 1 else None
    return {
        "format": "gguf",
        "architecture": arch,
        "tensor_types": counts,
        "bits": bits,
        "group_size": 32 if bits else None,
        "tensors": len(r.tensors),
    }


def inspect(path, *, verify: bool = False) -> dict:
    """A dict describing the checkpoint at ``path`` (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"[inspect] {path} does not exist")
    folder = path if path.is_dir() else path.parent
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if path.is_dir() else [path]
    info: dict = {"path": str(path), "files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    manifest = _json(folder / MANIFEST)
    cfg = _json(folder / "config.json") or {}
    ggufs = [p for p in files if p.suffix == ".gguf"]
    qc = cfg.get("quantization_config") or {}
    if ggufs:
        info.update(_gguf_info(ggufs[0]))
    elif qc.get("quant_method") == "compressed-tensors":
        groups = qc.get("config_groups") or {}
        w = (next(iter(groups.values()), {}) or {}).get("weights") or {}
        info.update(
            {
                "format": f"compressed-tensors/{qc.get('format')}",
                "bits": w.get("num_bits"),
                "type": w.get("type"),
                "group_size": w.get("group_size"),
                "symmetric": w.get("symmetric"),
                "strategy": w.get("strategy"),
                "ignore": qc.get("ignore"),
            }
        )
    elif qc.get("quant_method") == "gptq":
        info.update(
            {
                "format": f"gptq/{qc.get('checkpoint_format', qc.get('format', 'gptq'))}",
                "bits": qc.get("bits"),
                "group_size": qc.get("group_size"),
                "symmetric": qc.get("sym"),
                "desc_act": qc.get("desc_act"),
            }
        )
    elif isinstance(cfg.get("quantization"), dict) and "bits" in cfg["quantization"]:
        q = cfg["quantization"]
        info.update(
            {"format": f"mlx/{q.get('mode', 'affine')}", "bits": q.get("bits"), "group_size": q.get("group_size")}
        )
    elif qc:
        info.update({"format": str(qc.get("quant_method", "unknown-quantized")), "bits": qc.get("bits")})
    elif list(folder.glob("*.safetensors")):
        info.update({"format": "dense", "dtype": cfg.get("dtype", cfg.get("torch_dtype"))})
        info.update(_sparsity(folder))
    else:
        info["format"] = "unknown"
    info["architecture"] = info.get("architecture") or (cfg.get("architectures") or [None])[0]
    if manifest:
        info["producer"] = manifest.get("producer")
        info["source"] = manifest.get("source")
        info["settings"] = manifest.get("settings")
        info["seed"] = manifest.get("seed")
    else:
        quantizer = (qc.get("meta") or {}).get("quantizer")
        info["producer"] = (
            ", ".join(quantizer)
            if isinstance(quantizer, list)
            else ("compressed-tensors " + qc["version"] if qc.get("version") else "unknown (no calibra manifest)")
        )
    if verify:
        problems = verify_manifest(folder)
        info["verified"] = not problems
        info["problems"] = problems
    return info


def format_report(info: dict) -> str:
    keys = [
        "path",
        "format",
        "architecture",
        "bits",
        "group_size",
        "symmetric",
        "desc_act",
        "strategy",
        "type",
        "tensor_types",
        "sparsity",
        "files",
        "bytes",
        "producer",
        "source",
        "seed",
    ]
    lines = []
    for k in keys:
        if info.get(k) is None:
            continue
        v = info[k]
        if k == "bytes":
            v = f"{v} ({v / 2**20:.2f} MiB)"
        elif k == "sparsity":
            v = f"{v:.4f} of {info.get('linear_weights')} Linear weights are zero"
        lines.append(f"{k:13s} {v}")
    if "verified" in info:
        lines.append(f"{'verified':13s} {'ok: every sha256 matches the manifest' if info['verified'] else 'FAILED'}")
        lines += [f"  {p}" for p in info["problems"]]
    return "\n".join(lines)
