"""Streamed pruning (``stream=True``) writes, layer by layer, exactly the whole-model job's pruned weights
cast to the checkpoint's stored dtype, the same sparsity metadata, and refuses what it cannot do yet before
reading a weight."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import calibra  # noqa: E402
from calibra.data import CalibrationConfig  # noqa: E402
from calibra.prune.config import PruningConfig  # noqa: E402

from .test_streamed_quantize import _files, _tensors  # noqa: E402


def _prune(out, cfg, **kw):
    return calibra.prune(
        "builtin:tiny-llama",
        cfg,
        CalibrationConfig(num_samples=8, sequence_length=64, seed=0),
        output=out,
        evaluate=False,
        progress=False,
        echo=None,
        **kw,
    )


@pytest.mark.parametrize(
    "cfg",
    [
        PruningConfig(method="magnitude", target_sparsity=0.5),
        PruningConfig(method="wanda", pattern="2:4"),
        PruningConfig(method="sparsegpt", target_sparsity=0.5),
    ],
    ids=["magnitude", "wanda-2:4", "sparsegpt"],
)
def test_streamed_prune_equals_whole_model(cfg, tmp_path):
    _, whole = _prune(tmp_path / "whole", cfg)
    _, rep = _prune(tmp_path / "streamed", cfg, stream=True)
    assert rep["plan"]["placement"].startswith("streamed") and rep["streaming"]["bytes_read"] > 0
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert set(a) == set(b)
    for k in a:  # whole-model: float32 (its dtype); streamed: the stored bf16
        assert b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k]), k
        if k.endswith("proj.weight"):
            assert torch.equal(a[k] == 0, b[k] == 0), k  # the sparsity pattern survives the cast
    sw = json.loads((tmp_path / "whole" / "sparsity.json").read_text())
    ss = json.loads((tmp_path / "streamed" / "sparsity.json").read_text())
    assert sw == ss
    assert whole["summary"] == rep["summary"]
    assert not calibra.export.verify_manifest(tmp_path / "streamed")


def test_streamed_prune_refusals(tmp_path, monkeypatch):
    from calibra.io import streamed

    monkeypatch.setattr(streamed.WeightStore, "read", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    for kw, needle in [
        (dict(save_24=True), "--save-24"),
    ]:
        args = dict(output=tmp_path / "out", evaluate=False, stream=True)
        args.update(kw)
        cfg = PruningConfig(method="magnitude", pattern="2:4")
        with pytest.raises(ValueError, match="stream") as e:
            calibra.prune("builtin:tiny-llama", cfg, progress=False, echo=None, **args)
        assert needle in str(e.value)
    assert not (tmp_path / "out").exists()


def test_streamed_prune_evaluates_layer_by_layer_as_the_whole_model_does(tmp_path):
    """Magnitude pruning keeps the surviving weights as stored, so the bf16 output the streamed job reads
    back is the whole-model job's pruned model exactly: the two evaluations agree to float32 rounding."""
    cfg = PruningConfig(method="magnitude", target_sparsity=0.5)
    kw = dict(evaluate=True, eval_max_tokens=1536, eval_seq_len=256)
    _, whole = calibra.prune("builtin:tiny-llama", cfg, output=tmp_path / "w", progress=False, echo=None, **kw)
    _, streamed = calibra.prune(
        "builtin:tiny-llama", cfg, output=tmp_path / "s", stream=True, progress=False, echo=None, **kw
    )
    a, b = streamed["eval"], whole["eval"]
    assert b["kl_divergence"]["mean"] > 1e-3  # half the weights gone: a real difference
    assert a["kl_divergence"]["mean"] == pytest.approx(b["kl_divergence"]["mean"], rel=1e-4)
    assert a["perplexity"]["compressed"] == pytest.approx(b["perplexity"]["compressed"], rel=1e-5)
    assert json.loads((tmp_path / "s" / "report.json").read_text())["eval"] == a


@pytest.mark.parametrize(
    "cfg",
    [PruningConfig(method="magnitude", target_sparsity=0.5), PruningConfig(method="sparsegpt", target_sparsity=0.5)],
    ids=["magnitude", "sparsegpt"],
)
def test_streamed_prune_resume_is_byte_identical(cfg, tmp_path, interrupt_after_layer):
    """Interrupted after layer 1 is committed, the streamed prune resumes from the shards in its work folder
    and writes the bytes of an uninterrupted streamed run."""
    from calibra.io import checkpoint

    _prune(tmp_path / "ref", cfg, stream=True)
    interrupt_after_layer(lambda: _prune(tmp_path / "out", cfg, stream=True))
    _, rep = _prune(tmp_path / "out", cfg, stream=True, resume=True)
    assert rep["resumed_from_layer"] == 2
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
    assert not checkpoint.work_dir(tmp_path / "out").exists()
