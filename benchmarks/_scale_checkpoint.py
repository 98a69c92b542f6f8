"""Random-weight checkpoints with real configs, for the scale benchmark (``bench_scale.py``).

``ensure(shape, cache)`` writes, once, a Hugging Face folder whose config is a real model's (Llama-3-8B or
TinyLlama-1.1B) and whose weights are seeded random bf16 (Linear and embedding weights ~ N(0, 0.02),
norms 1), in 5 GB shards with an index, plus the builtin tiny-llama tokenizer (its ids are a subset of
the model's vocabulary, which is all calibration needs). The folder lives in a cache outside the
repository (``$CALIBRA_BENCH_CACHE``, default ``~/.cache/calibra-bench``) and is reused while its
``calibra_bench.json`` says it is complete; a half-written folder is never mistaken for a finished one
(written under a temporary name, renamed at the end).

Tensors are generated one at a time (seeded by their name), so writing needs one shard in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

SHAPES = {
    # meta-llama/Meta-Llama-3-8B config.json (the fields that shape the weights and the forward)
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    ),
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
}
SHARD_BYTES = 5 * 10**9
FORMAT = 1


def cache_dir() -> Path:
    return Path(os.environ.get("CALIBRA_BENCH_CACHE", Path.home() / ".cache" / "calibra-bench"))


def _config(shape: str):
    from transformers import LlamaConfig

    kw = dict(SHAPES[shape])
    theta = kw.pop("rope_theta")
    cfg = LlamaConfig(
        **kw,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    return cfg


def _shapes(cfg) -> dict[str, tuple[int, ...]]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def _natural(name: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def ensure(shape: str, cache: Path | None = None, echo=print) -> Path:
    """The folder of ``shape`` ("8b" or "1b"), written first if it is not complete in the cache."""
    from safetensors.torch import save_file

    folder = (cache or cache_dir()) / f"llama-{shape}-random-bf16"
    stamp = folder / "calibra_bench.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("format") == FORMAT:
        return folder
    cfg = _config(shape)
    shapes = _shapes(cfg)
    names = sorted(shapes, key=_natural)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nb = 2 * int(torch.Size(shapes[n]).numel())
        if shards[-1] and size + nb > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        part = {n: _tensor(n, shapes[n]) for n in shard}
        save_file(part, str(tmp / fname), metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = fname
            total += part[n].numel() * 2
        echo(f"  wrote {fname} ({sum(p.numel() * 2 for p in part.values()) / 1e9:.2f} GB)")
        del part
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    cfg.save_pretrained(tmp)
    from calibra.assets import resolve_model

    tok = resolve_model("builtin:tiny-llama")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, tmp / f)
    (tmp / "calibra_bench.json").write_text(
        json.dumps({"format": FORMAT, "shape": shape, "bytes": total, "seconds": time.perf_counter() - t0})
    )
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    echo(f"  {folder}: {total / 1e9:.1f} GB in {time.perf_counter() - t0:.0f} s")
    return folder


if __name__ == "__main__":
    import sys

    for s in sys.argv[1:] or ["1b", "8b"]:
        print(ensure(s))
