"""Bad inputs fail before the model loads, and nothing is written (FAULTS 10, 11, 13, 26)."""

from __future__ import annotations

import json
import shutil

import pytest

import calibra
from calibra.prune import PruningConfig


@pytest.fixture
def no_load(monkeypatch):
    """Any weight load fails the test: the errors below must come first."""
    import calibra.assets as assets

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(assets, "load_model", boom)


def _nothing_written(tmp_path):
    return [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="sparsegpt", target_sparsity=1.5), "target_sparsity"),
        (dict(method="wanda", target_sparsity=0.0), "target_sparsity"),
        (dict(method="obs"), "method must be one of"),
        (dict(method="wanda", pattern="2:4", target_sparsity=0.7), "fixes the sparsity"),
        (dict(method="sparsegpt", damp_percent=2.0), "damp_percent"),
        (dict(method="sparsegpt", block_size=0), "block_size"),
    ],
)
def test_bad_config_before_load(llama_dir, tmp_path, no_load, kw, match):
    with pytest.raises(ValueError, match=match):
        calibra.prune(str(llama_dir), PruningConfig(**kw), output=tmp_path / "out", progress=False, echo=None)
    assert _nothing_written(tmp_path)


def test_indivisible_pattern_lists_every_layer(llama_dir, tmp_path, no_load):
    # 1x64 tiles divide the 64-wide inputs but not down_proj's 96
    with pytest.raises(ValueError) as e:
        calibra.prune(
            str(llama_dir),
            PruningConfig(method="magnitude", pattern="block:1x64", target_sparsity=0.5),
            output=tmp_path / "out",
            progress=False,
            echo=None,
        )
    msg = str(e.value)
    assert msg.startswith("[prune]") and "skip_indivisible" in msg
    assert "model.layers.0.mlp.down_proj" in msg and "model.layers.1.mlp.down_proj" in msg
    assert _nothing_written(tmp_path)


def test_save24_needs_24(llama_dir, tmp_path, no_load):
    with pytest.raises(ValueError, match="needs pattern 2:4"):
        calibra.prune(
            str(llama_dir),
            PruningConfig(method="magnitude", pattern="4:8", target_sparsity=None),
            output=tmp_path / "out",
            save_24=True,
            progress=False,
            echo=None,
        )
    assert _nothing_written(tmp_path)


def test_existing_output_refused(llama_dir, tmp_path, no_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    with pytest.raises(FileExistsError, match=r"^\[prune\].*overwrite"):
        calibra.prune(str(llama_dir), PruningConfig(method="magnitude"), output=out, progress=False, echo=None)
    assert (out / "keep.txt").read_text() == "earlier result"


def test_overwrite_replaces_whole(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    calibra.prune(
        str(llama_dir), PruningConfig(method="magnitude"), output=out, overwrite=True, progress=False, echo=None
    )
    assert not (out / "stale.txt").exists() and (out / "report.json").is_file()


def test_quantized_model_refused(llama_dir, tmp_path, no_load):
    src = tmp_path / "q"
    shutil.copytree(llama_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"\[prune\].*quantization_config.*gptq"):
        calibra.prune(str(src), PruningConfig(method="magnitude"), output=tmp_path / "out", progress=False, echo=None)
    assert not (tmp_path / "out").exists()


def test_not_a_config(llama_dir, no_load):
    with pytest.raises(TypeError, match="PruningConfig"):
        calibra.prune(str(llama_dir), {"method": "wanda"}, progress=False, echo=None)


def test_failure_during_run_leaves_nothing(llama_dir, calib, tmp_path, monkeypatch):
    """A solver error mid-run: the stage machine fails, no folder and no temp folder remain."""
    import calibra.prune.apply as ap

    calls = {"n": 0}
    real = ap.prune_weight

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise RuntimeError("solver exploded")
        return real(*a, **k)

    monkeypatch.setattr(ap, "prune_weight", flaky)
    with pytest.raises(RuntimeError, match="solver exploded"):
        calibra.prune(
            str(llama_dir),
            PruningConfig(method="wanda"),
            calib,
            output=tmp_path / "out",
            progress=False,
            echo=None,
            device="cpu",
        )
    assert _nothing_written(tmp_path)
