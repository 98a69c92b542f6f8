"""Mixed precision streamed from disk (``mixed_precision=BUDGET`` with ``stream=True``): the sensitivity
pass reads each layer from the shards, scores its modules on that layer's statistics and drops them, the
solve promotes the same modules as the whole-model job's, and the quantization pass writes exactly the
whole-model job's quantized tensors (dense tensors at their stored dtype), resumable byte-identical; the
planner shows the sensitivity pass as a phase of its own."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import calibra  # noqa: E402
from calibra.data import CalibrationConfig  # noqa: E402
from calibra.quant import GPTQConfig, RTNConfig  # noqa: E402
from calibra.quant import mixed as mp  # noqa: E402

from .test_streamed_quantize import _files, _tensors  # noqa: E402

BUDGET = 4.5  # int3 g32 is 3.5 bits/weight: about a third of the weights promoted to int8


def _cfg(method):
    return GPTQConfig(bits=3, group_size=32) if method == "gptq" else RTNConfig(bits=3, group_size=32)


def _quantize(model, out, cfg, **kw):
    return calibra.quantize(
        model,
        cfg,
        CalibrationConfig(num_samples=8, sequence_length=64, seed=0),
        output=out,
        evaluate=False,
        progress=False,
        echo=None,
        mixed_precision=BUDGET,
        **kw,
    )


@pytest.mark.parametrize(
    "model,method,export",
    [
        ("builtin:tiny-llama", "gptq", None),
        ("builtin:tiny-llama", "rtn", None),
        ("builtin:tiny-moe", "gptq", None),
    ],
    ids=["llama-gptq", "llama-rtn", "moe-gptq"],
)
def test_streamed_mixed_precision_equals_whole_model(model, method, export, tmp_path):
    cfg = _cfg(method)
    _, whole = _quantize(model, tmp_path / "whole", cfg, export=export)
    _, rep = _quantize(model, tmp_path / "streamed", cfg, export=export, stream=True)
    assert rep["plan"]["placement"].startswith("streamed") and "streaming" not in whole
    assert "sensitivity" in rep["plan"]["phases"] and "sensitivity" not in whole["plan"]["phases"]
    plan = rep["mixed_precision"]
    assert plan == whole["mixed_precision"]  # the same sensitivities, bit for bit, and the same promotions
    assert plan["promoted"] and len(plan["promoted"]) < len(plan["sensitivity"])
    assert rep["summary"] == whole["summary"] and rep["summary"]["avg_bits_per_weight"] <= BUDGET + 1e-9
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert set(a) == set(b)
    for k in a:
        if a[k].dtype == b[k].dtype:
            assert torch.equal(a[k], b[k]), k
        else:  # dense tensors: float32 in the whole-model job (its compute dtype), stored bf16 when streamed
            assert b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k].float()), k
    assert not calibra.export.verify_manifest(tmp_path / "streamed")


def test_streamed_sensitivity_pass_reads_one_layer_at_a_time(tmp_path, monkeypatch):
    """The sensitivity pass is a streamed pass of its own: every layer loaded and released before the next
    is scored, and the whole model is never resident (each layer is loaded twice in all: once scored, once
    quantized)."""
    from calibra.io.streamed import StreamedModel

    events = []
    load, release = StreamedModel.load, StreamedModel.release
    monkeypatch.setattr(StreamedModel, "load", lambda s, m, *a, **k: (events.append(("+", id(m))), load(s, m, *a, **k)))
    monkeypatch.setattr(StreamedModel, "release", lambda s, m: (events.append(("-", id(m))), release(s, m)))
    _, rep = _quantize("builtin:tiny-llama", tmp_path / "out", _cfg("rtn"), stream=True)
    held = peak = 0
    for sign, _ in events:
        held += 1 if sign == "+" else -1
        peak = max(peak, held)
    n_layers = rep["model"]["num_layers"]
    loads = [m for s, m in events if s == "+"]
    assert peak <= 2 and held == 0  # a layer (or the embeddings beside the first one), never the model
    assert len(loads) >= 2 * n_layers


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_streamed_mixed_precision_resume_is_byte_identical(method, tmp_path, interrupt_after_layer):
    """Interrupted after layer 1's commit, the streamed job reruns the sensitivity pass (the same
    promotions), continues from its checkpoints and writes the bytes of an uninterrupted streamed run."""

    cfg = _cfg(method)
    _, ref = _quantize("builtin:tiny-llama", tmp_path / "ref", cfg, stream=True)
    interrupt_after_layer(lambda: _quantize("builtin:tiny-llama", tmp_path / "out", cfg, stream=True))
    _, rep = _quantize("builtin:tiny-llama", tmp_path / "out", cfg, stream=True, resume=True)
    assert rep["resumed_from_layer"] == 2
    assert rep["mixed_precision"] == ref["mixed_precision"]
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_plan_accounts_for_the_sensitivity_pass(tmp_path):
    """--dry-run: the streamed plan has the sensitivity pass as a phase (one layer, its statistics and the
    scoring); the whole-model plan keeps every layer's statistics from it."""
    kw = dict(dry_run=True)
    _, whole = _quantize("builtin:tiny-llama", tmp_path / "w", _cfg("gptq"), stream=False, **kw)
    _, plain = calibra.quantize(
        "builtin:tiny-llama",
        _cfg("gptq"),
        CalibrationConfig(num_samples=8, sequence_length=64, seed=0),
        output=tmp_path / "p",
        dry_run=True,
        stream=False,
        progress=False,
        echo=None,
    )
    _, streamed = _quantize("builtin:tiny-llama", tmp_path / "s", _cfg("gptq"), stream=True, **kw)
    phases = streamed["plan"]["phases"]
    assert phases["sensitivity"] > phases["rest of the output"] and "sensitivity" not in whole["plan"]["phases"]
    assert whole["plan"]["phases"]["layers"] > plain["plan"]["phases"]["layers"]  # the kept statistics
    assert not (tmp_path / "s").exists() and mp.bits_per_weight(_cfg("gptq")) < BUDGET


@pytest.mark.parametrize("stream", [False, True])
def test_mixed_precision_with_a_one_scheme_export_is_refused_before_any_read(stream, tmp_path, monkeypatch):
    """compressed-tensors writes one int scheme per checkpoint; the int8 promotions would fail it at the
    very end (after every layer was quantized): both placements refuse it before a weight is read."""
    from calibra.io import streamed
    from calibra.jobs import common

    monkeypatch.setattr(streamed.WeightStore, "read", lambda *a, **k: pytest.fail("a weight was read"))
    monkeypatch.setattr(common, "read_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match="mixed precision.*one scheme per checkpoint"):
        _quantize("builtin:tiny-llama", tmp_path / "out", _cfg("gptq"), export="compressed-tensors", stream=stream)
    assert not (tmp_path / "out").exists()


def test_streamed_mixed_precision_from_a_statistics_file_equals_whole_model(tmp_path):
    """With ``stats``, each layer is scored from the file's statistics as it loads (no calibration pass):
    the whole-model job's promotions and tensors (GPTQ solved from the same file)."""
    cfg = GPTQConfig(bits=3, group_size=32, true_sequential=False)
    stats = calibra.calibrate(
        "builtin:tiny-llama", CalibrationConfig(num_samples=8, sequence_length=64, seed=0), progress=False, echo=None
    )
    _, whole = _quantize("builtin:tiny-llama", tmp_path / "whole", cfg, stats=stats)
    _, rep = _quantize("builtin:tiny-llama", tmp_path / "streamed", cfg, stats=stats, stream=True)
    assert rep["plan"]["placement"].startswith("streamed")
    assert rep["mixed_precision"] == whole["mixed_precision"] and rep["mixed_precision"]["promoted"]
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k] if a[k].dtype == b[k].dtype else b[k].float()), k
