"""``calibra prune --resume`` (FAULTS rows 22-24 for pruning): an interrupted run resumed from its layer
checkpoints writes the same bytes as an uninterrupted one; a resume with other settings is refused."""

from __future__ import annotations

import json

import pytest

import calibra
from calibra.data import CalibrationConfig
from calibra.io.checkpoint import ResumeError, work_dir
from calibra.prune import PruningConfig
from tests.io.conftest import build
from tests.io.test_resume import _hashes, _interrupt_after

LAYERS = 4
CAL = dict(num_samples=4, sequence_length=32, min_tokens=16, seed=7)
CONFIGS = {
    "sparsegpt-2:4": PruningConfig(method="sparsegpt", pattern="2:4"),
    "wanda-unstructured": PruningConfig(method="wanda", target_sparsity=0.5),
    "magnitude (no data)": PruningConfig(method="magnitude", target_sparsity=0.4),
}


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pm4")
    build(folder, num_hidden_layers=LAYERS)
    return folder


@pytest.fixture(scope="module")
def moe4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pmoe4")
    build(folder, arch="mixtral", num_hidden_layers=LAYERS)
    return folder


def _p(model, out, cfg, **kw):
    return calibra.prune(
        str(model), cfg, CalibrationConfig(**CAL), output=out, evaluate=False, progress=False, echo=None, **kw
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_interrupted_prune_resumes_to_the_same_bytes(model4, tmp_path, monkeypatch, name):
    cfg = CONFIGS[name]
    ref = tmp_path / "ref"
    _p(model4, ref, cfg, checkpoint=False)
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _p(model4, out, cfg)
    monkeypatch.undo()
    assert not out.exists()
    assert len(list(work_dir(out).glob("layer-*.json"))) == 2
    with pytest.raises(ResumeError, match=r"\(2 layer\(s\) finished\): pass --resume"):
        _p(model4, out, cfg)
    _, report = _p(model4, out, cfg, resume=True)
    assert report["resumed_from_layer"] == 2
    assert _hashes(out) == _hashes(ref), f"{name}: the resumed output differs"
    doc = json.loads((out / "report.json").read_text())
    want = json.loads((ref / "report.json").read_text())
    key = lambda r: r["module"]  # noqa: E731
    for a, b in zip(sorted(doc["modules"], key=key), sorted(want["modules"], key=key)):
        a.pop("seconds"), b.pop("seconds")
        assert a == b  # the restored layers' logs too
    assert not work_dir(out).exists(), "checkpoints are removed once the output is complete"


def test_interrupted_moe_prune_resumes_to_the_same_bytes(moe4, tmp_path, monkeypatch):
    """Fused expert slices and the MoE routing statistics come back too."""
    cfg = PruningConfig(method="sparsegpt", target_sparsity=0.5)
    ref = tmp_path / "ref"
    _, want = _p(moe4, ref, cfg, checkpoint=False)
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _p(moe4, out, cfg)
    monkeypatch.undo()
    _, got = _p(moe4, out, cfg, resume=True)
    assert got["resumed_from_layer"] == 3
    assert _hashes(out) == _hashes(ref)
    assert sum("experts" in r["module"] for r in got["modules"]) > 0


def test_prune_resume_refused_for_other_settings(model4, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        _p(model4, out, PruningConfig(method="wanda", target_sparsity=0.5))
    monkeypatch.undo()
    with pytest.raises(
        ResumeError,
        match=r"the config differs from the checkpointed run: pruning\.target_sparsity was "
        r"0\.5, now 0\.6",
    ):
        _p(model4, out, PruningConfig(method="wanda", target_sparsity=0.6), resume=True)
    with pytest.raises(ValueError, match="resume needs an output folder and checkpoints"):
        calibra.prune(
            str(model4), PruningConfig(method="wanda", target_sparsity=0.5), resume=True, progress=False, echo=None
        )
