"""Fixtures of the eval tests: a locally trained tokenizer, a random tiny Llama, a token stream."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from calibra import assets  # noqa: E402
from tests.eval.tiny import make_llama, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def llama(tokenizer):
    return make_llama(len(tokenizer))


@pytest.fixture(scope="session")
def eval_ids(tokenizer):
    """~1.5k tokens of the held-out eval text, EOS between documents."""
    from calibra.eval import token_stream

    ids = token_stream(tokenizer, assets.builtin_texts("eval")[:12])
    assert len(ids) > 1500
    return torch.tensor(ids[:1500], dtype=torch.long)
