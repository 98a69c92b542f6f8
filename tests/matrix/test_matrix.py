"""The model matrix's in-suite sample: tiny random models of representative families (explicit adapters,
GPT-2's Conv1D, parallel blocks, ALiBi, sliding windows, MLA, MoE with experts quantized per expert
and with experts kept dense, a hybrid, a vision-language model) through quantize -> rebuild -> compare ->
export compressed-tensors (+ GPTQ for MoE) -> reload with transformers -> logits equal to calibra's
simulated model (``run_one.run_type``), and refusals that name their reason. ``tools/model_matrix.py``
runs every type and writes docs/model_matrix.md."""

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
    "deepseek_v3",  # MLA, MoE with shared experts (structural)
    "olmoe",  # MoE (structural)
    "gpt_oss",  # MoE with expert biases and interleaved gate/up, quantized per expert; stored fused on disk
    "smollm3",
    "bamba",  # hybrid: Mamba-2 and attention layers
    "llama4_text",  # dense fused experts that transformers swaps for per-expert Linears on a quantized load
    "nemotron_h",  # dense experts that transformers' compressed-tensors load drops (checked decompressed)
]
REFUSED = ["bert", "xlnet"]
# export refused by calibra with its reason: GPT-2-style Conv1D layers load in no engine as nn.Linear
EXPORT_REFUSED = {"gpt2", "gpt_oss"}  # and gpt-oss's quantized experts, which its checkpoint stores fused
MOE_QUANTIZED = {"mixtral", "deepseek_v3", "olmoe", "nemotron_h"}  # experts quantized and exported per expert


@pytest.mark.parametrize("model_type", SAMPLE)
def test_family_quantizes_and_rebuilds(model_type, tmp_path):
    cell = run_type(model_type, tmp_path)
    assert cell.status == "pass", cell.detail
    assert cell.quantized > 0
    if model_type in EXPORT_REFUSED:
        assert cell.export.startswith("compressed-tensors refused:"), cell.export
    else:
        assert cell.export.startswith("ok: compressed-tensors reload"), cell.export
    assert ("MoE GPTQ reload" in cell.export) == (model_type in MOE_QUANTIZED), cell.export


@pytest.mark.parametrize("model_type", REFUSED)
def test_family_refused_with_reason(model_type, tmp_path):
    cell = run_type(model_type, tmp_path)
    assert cell.status == "refused" and cell.detail, cell
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize(("model_type", "merged"), [("olmo_hybrid", ".linear_attn.conv1d.weight"), ("llama", None)])
def test_dense_tensors_transformers_merges_on_load_are_named(model_type, merged, tmp_path):
    """A compressed-tensors export whose dense tensors transformers' loader must merge back (OLMo-Hybrid's
    q/k/v_conv1d -> conv1d), which its compressed-tensors load drops, names them in the manifest and says so
    in the model card; a model without such tensors says nothing."""
    import json

    cell = run_type(model_type, tmp_path)
    assert cell.export.startswith("ok"), cell.export
    man = json.loads((tmp_path / "ct" / "calibra_manifest.json").read_text())
    card = (tmp_path / "ct" / "README.md").read_text()
    if merged is None:
        assert "merged_on_load" not in man["checkpoint"] and "merges on load" not in card
    else:
        names = man["checkpoint"]["merged_on_load"]
        assert names and all(k.endswith(merged) for k in names)
        assert "merges on load" in card
