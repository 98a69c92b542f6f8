"""The builtin models end to end (skipped only when a model folder is not installed)."""

from __future__ import annotations

import pytest

import calibra
from calibra.assets import ASSETS_DIR
from calibra.data import CalibrationConfig
from calibra.quant import GPTQConfig, RTNConfig


def _need(name):
    if not (ASSETS_DIR / "models" / name / "config.json").is_file():
        pytest.skip(f"builtin:{name} is not installed")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-moe"])
def test_builtin_eval_on_by_default_and_gptq_beats_rtn(name, tmp_path):
    _need(name)
    kw = dict(eval_max_tokens=1024, eval_seq_len=256, progress=False, echo=None)
    _, rtn = calibra.quantize(f"builtin:{name}", RTNConfig(bits=3, group_size=128), **kw)
    # true_sequential off keeps this test fast (one pass per layer); the API tests cover the recollect path
    _, gptq = calibra.quantize(
        f"builtin:{name}",
        GPTQConfig(bits=3, group_size=128, true_sequential=False),
        CalibrationConfig(num_samples=8, sequence_length=128),
        output=tmp_path / "o",
        **kw,
    )
    for rep in (rtn, gptq):  # evaluation ran without being asked: builtin model
        assert rep["eval"]["perplexity"]["compressed"] > 1
    assert rtn["eval"]["perplexity"]["baseline"] == gptq["eval"]["perplexity"]["baseline"]
    assert gptq["eval"]["kl_divergence"]["mean"] < rtn["eval"]["kl_divergence"]["mean"]
    if name == "tiny-moe":
        assert gptq["moe_coverage"] and sum(r["tokens"] for r in gptq["moe_coverage"]) == 2 * 8 * 128 * 3
