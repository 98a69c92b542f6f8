"""Local tiny model folders (random weights, a small BPE tokenizer trained on builtin text): no network,
no trained asset needed."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

CAL_KW = dict(num_samples=4, sequence_length=32)
EVAL_TOKENS = 300


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from calibra.assets import builtin_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        builtin_texts("code")[:40],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<eos>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_folder(folder, arch: str = "llama", dtype=torch.float32, **over):
    fast = _tokenizer()
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    kw = dict(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kw.update(over)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**kw)
    else:
        cfg = transformers.MixtralConfig(**kw, num_local_experts=4, num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("q-llama"), "llama")


@pytest.fixture(scope="session")
def ragged_folder(tmp_path_factory):
    """The issue 21 example: intermediate_size 172, so groups of 32 leave down_proj a ragged last group of 12
    (and FP4's blocks of 16/32 do not fit it)."""
    return make_folder(tmp_path_factory.mktemp("q-ragged"), "llama", intermediate_size=172)


@pytest.fixture(scope="session")
def moe_folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("q-moe"), "mixtral")


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if any weight is loaded."""
    import calibra.assets

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(calibra.assets, "load_model", boom)
