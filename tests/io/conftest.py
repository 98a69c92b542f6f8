"""Tiny local model folders for the model-reading tests: random weights (seconds to build), the builtin
tokenizer's files copied in (so loading works), no network."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from calibra.assets import ASSETS_DIR  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DIMS = dict(
    vocab_size=4096,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def build(folder, *, arch="llama", max_shard_size=None, seed=0, **over):
    """Save a random-weight model (and the builtin tokenizer) into ``folder``; returns the model."""
    torch.manual_seed(seed)
    kw = dict(DIMS, **over)
    cfg = (
        transformers.LlamaConfig(**kw)
        if arch == "llama"
        else transformers.MixtralConfig(**kw, num_local_experts=4, num_experts_per_tok=2)
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **extra)
    for f in TOKENIZER_FILES:
        src = ASSETS_DIR / "models" / "tiny-llama" / f
        if src.is_file():
            shutil.copy(src, folder / f)
    return model


def write_raw_safetensors(path, header: dict, data: bytes, length: int | None = None) -> None:
    """A safetensors file with exactly this header and data (for crafting corrupt files)."""
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length))
        f.write(raw)
        f.write(data)


@pytest.fixture(scope="session")
def base_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base-llama")
    build(folder)
    return folder


@pytest.fixture(scope="session")
def base_sharded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base-sharded")
    build(folder, max_shard_size="300KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.fixture
def llama(base_llama, tmp_path):
    """A private copy the test may corrupt."""
    dst = tmp_path / "model"
    shutil.copytree(base_llama, dst)
    return dst


@pytest.fixture
def sharded(base_sharded, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(base_sharded, dst)
    return dst


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if any weight is loaded (every verb loads through calibra.assets.load_model)."""
    import calibra.assets

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the bad input was refused")

    monkeypatch.setattr(calibra.assets, "load_model", boom)
