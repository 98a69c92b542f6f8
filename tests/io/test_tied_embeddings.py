"""FAULTS row 9: a model with tied embeddings (lm_head is embed_tokens) stays consistent through every
artifact calibra writes: config.json keeps tie_word_embeddings, the tensor is stored once, and the reload
is tied again and gives the same logits."""

from __future__ import annotations

import json

import pytest

import calibra
from calibra.prune import PruningConfig
from calibra.quant import RTNConfig
from tests.io.conftest import build, torch


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tied")
    model = build(folder, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return folder


def _logits(model):
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_quantized_folder_keeps_the_tie(tied, tmp_path):
    from safetensors import safe_open

    from calibra.quant import save as qsave

    qm, _ = calibra.quantize(
        str(tied), RTNConfig(group_size=16), output=tmp_path / "q", evaluate=False, progress=False, echo=None
    )
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(tmp_path / "q" / qsave.WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    model, _ = qsave.load(tmp_path / "q")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_logits(model), _logits(qm.model), rtol=0, atol=1e-5)


def test_pruned_folder_keeps_the_tie(tied, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = calibra.prune(
        str(tied), PruningConfig(method="magnitude"), output=tmp_path / "p", evaluate=False, progress=False, echo=None
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype=torch.float32)
    assert reloaded.config.tie_word_embeddings is True
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-5)
