"""The report's evaluation settings are checked against the model's config before any weight is read,
for both compressing verbs (an out-of-range window used to fail after the whole job had run)."""

from __future__ import annotations

import pytest

import calibra.jobs.common as job
from calibra.cli import main


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model's weights were read before the settings were checked")

    monkeypatch.setattr(job, "read_model", refuse)


@pytest.mark.parametrize("verb, method", [("quantize", "rtn"), ("prune", "magnitude")])
def test_eval_seq_len_beyond_the_context_is_refused_first(tmp_path, no_weights, verb, method):
    out = tmp_path / "out"
    with pytest.raises(
        ValueError,
        match=r"seq_len 1024 exceeds the model's max_position_embeddings 256; "
        r"pass --eval-seq-len 256 or less",
    ):
        main(
            [
                verb,
                "--input",
                "builtin:tiny-llama",
                "--output",
                str(out),
                "--method",
                method,
                "--eval-seq-len",
                "1024",
                "--no-progress",
            ]
        )
    assert not out.exists()
