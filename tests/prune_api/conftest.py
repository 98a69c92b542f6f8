"""Fixtures: small random-weight model folders (Llama, Mixtral with fused experts) with a locally trained
tokenizer, so the API and CLI tests need neither the trained builtin models nor the network."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.eval.tiny import train_tokenizer  # noqa: E402

DIMS = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.1,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(vocab_size=320)


def _save(tmp_path_factory, name, model, tokenizer):
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **DIMS)).float().eval()
    return _save(tmp_path_factory, "llama", model, tokenizer)


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = (
        MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), num_local_experts=4, num_experts_per_tok=2, **DIMS))
        .float()
        .eval()
    )
    with torch.no_grad():  # a router that actually spreads the tokens
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return _save(tmp_path_factory, "moe", model, tokenizer)


@pytest.fixture
def calib():
    from calibra.data import CalibrationConfig

    return CalibrationConfig(num_samples=4, sequence_length=32, min_tokens=16)
