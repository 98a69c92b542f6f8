"""The bundled models and texts: registry, shapes, tokenizer, held-out perplexity, expert usage.

Loads both models from wherever ``calibra`` is imported from (the installed package when run
against a wheel), offline (tests/conftest.py sets HF_HUB_OFFLINE=1). The perplexity band: the
first ``windows`` windows of the eval text must land within +-15% of the value recorded in the
model's training.json at build time (same protocol, calibra.assets._metrics.perplexity), and far
below the untrained model's.
"""

from __future__ import annotations

import hashlib
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from calibra import assets  # noqa: E402
from calibra.assets._metrics import expert_usage, perplexity, token_stream  # noqa: E402

PPL_BAND = 0.15
MODELS = ("tiny-llama", "tiny-moe")
CODE_PROMPT = "def read_config(path):\n"


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    model, tok = assets.load_model("builtin:" + request.param)
    return request.param, model, tok


# ------------------------------------------------------------------------------------- registry
def test_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_registry_resolves_builtin_models():
    assert set(assets.BUILTIN_MODELS) == set(MODELS)
    for name in MODELS:
        path = assets.resolve_model("builtin:" + name)
        for f in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "training.json",
        ):
            assert (path / f).is_file(), f
        size = sum(p.stat().st_size for p in path.iterdir())
        assert size < 16 * 1024 * 1024, f"{name} is {size / 1e6:.1f} MB"
        assert assets.is_builtin("builtin:" + name)
        # a local folder passes through unchanged
        assert assets.resolve_model(str(path)) == path
    assert assets.is_builtin("builtin") and not assets.is_builtin("./some/folder")


def test_unknown_builtin_lists_available_names():
    with pytest.raises(ValueError) as e:
        assets.resolve_model("builtin:foo")
    for name in MODELS:
        assert "builtin:" + name in str(e.value)
    with pytest.raises(FileNotFoundError, match="builtin:tiny-llama"):
        assets.resolve_model("no/such/model/folder")
    with pytest.raises(ValueError, match="calibration"):
        assets.builtin_texts("nope")


def test_assets_import_does_not_pull_transformers():
    import subprocess
    import sys

    code = "import sys, calibra.assets; print('transformers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.stdout.strip() == "False"


def test_builtin_texts_small_and_disjoint():
    # the stdlib sets (tools/train_builtin.py); the mixed-domain default: tests/test_builtin_text_sets.py
    calib = assets.builtin_records("code")
    evals = assets.builtin_records("eval")
    assert len(calib) >= 128 and len(evals) >= 64
    total = sum(len(r["text"].encode()) for r in calib + evals)
    assert total <= 2 * 1024 * 1024
    assert {r["kind"] for r in calib} == {"code", "docstring", "prose"}
    assert {r["kind"] for r in evals} == {"code", "docstring", "prose"}
    doc = lambda r: r["source"].rsplit("#", 1)[0]  # noqa: E731
    assert not ({doc(r) for r in calib} & {doc(r) for r in evals})
    assert assets.resolve_texts("builtin", "eval") == [r["text"] for r in evals]
    assert assets.builtin_texts("code") == [r["text"] for r in calib]


def test_heldout_documents_not_in_training_split():
    facts = assets.training_facts("tiny-llama")
    split = facts["corpus"]["split"]
    assert "eval < 6" in split and "calibration 6..11" in split
    for split_name, lo, hi in (("eval", 0, 6), ("code", 6, 12)):
        for r in assets.builtin_records(split_name):
            doc_id = r["source"][len("stdlib:") :].rsplit("#", 1)[0]
            bucket = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100
            assert lo <= bucket < hi, (split_name, doc_id)


# --------------------------------------------------------------------------------------- models
def test_config_shapes(loaded):
    name, model, tok = loaded
    cfg = model.config
    facts = assets.training_facts(name)
    assert cfg.hidden_size % 128 == 0 and cfg.intermediate_size % 128 == 0
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert not cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert cfg.vocab_size == len(tok) == 4096
    assert sum(p.numel() for p in model.parameters()) == facts["parameters"]
    assert next(model.parameters()).dtype == torch.float32
    if name == "tiny-llama":
        assert cfg.model_type == "llama" and cfg.hidden_act == "silu"
        assert 2e6 <= facts["parameters"] <= 8e6
        mlp = model.model.layers[0].mlp
        assert mlp.gate_proj.weight.shape == (cfg.intermediate_size, cfg.hidden_size)
    else:
        assert cfg.model_type == "mixtral"
        assert cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2
        assert 5e6 <= facts["parameters"] <= 15e6
        experts = model.model.layers[0].mlp.experts
        assert experts.gate_up_proj.shape == (8, 2 * cfg.intermediate_size, cfg.hidden_size)
        assert experts.down_proj.shape == (8, cfg.hidden_size, cfg.intermediate_size)
    x = torch.tensor([tok.encode(CODE_PROMPT)])
    with torch.no_grad():
        assert model(input_ids=x).logits.shape == (1, x.shape[1], cfg.vocab_size)


def test_stored_in_bfloat16():
    from safetensors import safe_open

    for name in MODELS:
        with safe_open(str(assets.resolve_model("builtin:" + name) / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_tokenizer_deterministic_and_round_trips(loaded):
    from transformers import AutoTokenizer

    name, _, tok = loaded
    texts = assets.builtin_texts("eval")[:20] + ["    return {'ünïcødé': 'π ≈ 3.14159', 'emoji': '🙂'}\n"]
    first = [tok.encode(t, add_special_tokens=False) for t in texts]
    again = AutoTokenizer.from_pretrained(assets.resolve_model("builtin:" + name), local_files_only=True)
    assert first == [tok.encode(t, add_special_tokens=False) for t in texts]
    assert first == [again.encode(t, add_special_tokens=False) for t in texts]
    for t, ids in zip(texts, first):
        assert tok.decode(ids) == t
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    # both models share one tokenizer
    tj = [(assets.resolve_model("builtin:" + n) / "tokenizer.json").read_bytes() for n in MODELS]
    assert tj[0] == tj[1]


def test_heldout_perplexity_in_band(loaded):
    name, model, tok = loaded
    facts = assets.training_facts(name)["eval"]
    ref = facts["heldout_ppl_first_windows"]
    ppl = perplexity(model, tok, assets.builtin_texts("eval"), max_windows=ref["windows"])
    assert abs(ppl - ref["trained"]) <= PPL_BAND * ref["trained"], (ppl, ref)
    assert ppl < ref["untrained"] / 20
    assert facts["heldout_ppl"] < facts["heldout_ppl_untrained"] / 20


def test_greedy_generation_looks_like_code(loaded):
    name, model, tok = loaded
    x = tok(CODE_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=32, do_sample=False)
    text = tok.decode(out[0, x.shape[1] :])
    assert any(line.startswith("    ") and line.strip() for line in text.split("\n")), text  # indented code
    assert sum(text.count(c) for c in "()=:.") >= 3, text


def test_every_expert_used_on_calibration_text():
    # Some experts are rare (see training.json); the build recorded, per expert, the first
    # calibration window that routes to it, so measuring those few windows is enough.
    model, tok = assets.load_model("builtin:tiny-moe")
    facts = assets.training_facts("tiny-moe")["expert_usage_calibration"]
    wins = {w for row in facts["first_window"] for w in row if w is not None}
    # training.json's windows were recorded on the stdlib calibration set (now builtin:code)
    counts = expert_usage(model, tok, assets.builtin_texts("code"), only_windows=wins)
    assert len(counts) == model.config.num_hidden_layers and all(len(r) == 8 for r in counts)
    for layer, row in enumerate(counts):
        assert sum(row) == 2 * 256 * len(wins)
        assert all(c > 0 for c in row), (layer, row)
    # the recorded full-calibration histogram: every expert used, unevenly
    for layer, row in enumerate(facts["counts"]):
        assert all(c > 0 for c in row) and not facts["unused_experts"][layer], (layer, row)
    for row in facts["fractions"]:
        assert max(row) > 2 * min(row), row


def test_token_stream_protocol():
    class Tok:
        eos_token_id = 0

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    assert token_stream(Tok(), ["ab", "c"]) == [97, 98, 0, 99, 0]
