"""The model matrix's in-suite sample: tiny random models of representative families (explicit adapters,
GPT-2's Conv1D, parallel blocks, ALiBi, sliding windows, MLA, MoE with dense experts, a hybrid, a
vision-language model) through quantize -> rebuild -> compare (``run_one.run_type``), and refusals
that name their reason. ``tools/model_matrix.py`` runs every type and writes docs/model_matrix.md."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from .run_one import run_type  # noqa: E402

SAMPLE = [
    "llama",  # explicit adapters
    "qwen3",
    "mixtral",
    "gpt2",  # Conv1D, positional layer calls
    "gpt_neox",
    "opt",
    "phi",  # parallel attention/MLP block
    "phi3",
    "gemma",  # (1 + w) norms
    "gemma2",
    "gemma3",  # vision-language: the language model only
    "falcon",
    "bloom",  # ALiBi
    "starcoder2",
    "olmo2",
    "granite",
    "cohere2",  # sliding-window layers
    "deepseek_v3",  # MLA, MoE
    "olmoe",
    "gpt_oss",
    "smollm3",
    "bamba",  # hybrid: Mamba-2 and attention layers
]
REFUSED = ["bert", "xlnet"]


@pytest.mark.parametrize("model_type", SAMPLE)
def test_family_quantizes_and_rebuilds(model_type, tmp_path):
    cell = run_type(model_type, tmp_path)
    assert cell.status == "pass", cell.detail
    assert cell.quantized > 0


@pytest.mark.parametrize("model_type", REFUSED)
def test_family_refused_with_reason(model_type, tmp_path):
    cell = run_type(model_type, tmp_path)
    assert cell.status == "refused" and cell.detail, cell
    assert not list(tmp_path.iterdir())  # refused before anything was written
