"""FAULTS rows 22-24: a quantize run killed (SIGKILL) at a random layer or in the middle of the save
resumes to output byte-identical to an uninterrupted run; a resume of a different run is refused; out of
memory keeps the finished layers."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import calibra
from calibra.cli import main
from calibra.data import CalibrationConfig
from calibra.io.checkpoint import ResumeError, work_dir
from calibra.quant import GPTQConfig
from tests.io.conftest import build, torch

LAYERS = 4
ARGS = [
    "--method",
    "gptq",
    "--group-size",
    "16",
    "--samples",
    "4",
    "--seq-len",
    "32",
    "--seed",
    "7",
    "--no-eval",
    "--no-progress",
]


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m4")
    build(folder, num_hidden_layers=LAYERS)
    return folder


@pytest.fixture(scope="module")
def reference(model4, tmp_path_factory):
    """An uninterrupted run (the bytes every resumed run must reproduce)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(["quantize", "--input", str(model4), "--output", str(out), *ARGS]) == 0
    return out


def _hashes(folder: Path) -> dict:
    """sha256 of every file the manifest lists (all but report.json and report.html: timings differ per run)."""
    man = json.loads((folder / "calibra_manifest.json").read_text())
    assert set(man["files"]) | {"calibra_manifest.json", "report.json", "report.html"} == {
        p.name for p in folder.iterdir()
    }
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in sorted(man["files"])} | {
        "calibra_manifest.json": hashlib.sha256((folder / "calibra_manifest.json").read_bytes()).hexdigest()
    }


def _spawn(model, out, pause_in: str, pause_after_layer: int | None = None) -> subprocess.Popen:
    """A real `calibra quantize` process that stops (sleeps) at a chosen point so the test can SIGKILL it."""
    script = textwrap.dedent(f"""
        import sys, time
        from calibra.io import checkpoint
        from calibra.export import writer
        from calibra.cli import main
        pause_in, k = {pause_in!r}, {pause_after_layer!r}
        if pause_in == "layer":
            save = checkpoint.LayerCheckpoints.save_layer
            def slow(self, i, *a, **kw):
                save(self, i, *a, **kw)
                if i == k:
                    time.sleep(120)
            checkpoint.LayerCheckpoints.save_layer = slow
        else:
            manifest = writer.write_manifest
            def slow(folder, **kw):
                (folder / "PAUSED").write_text("")  # the weights are in the temporary folder now
                time.sleep(120)
            writer.write_manifest = slow
        sys.exit(main(["quantize", "--input", {str(model)!r}, "--output", {str(out)!r}, *{ARGS!r}]))
    """)
    env = dict(os.environ, PYTHONPATH=str(Path(calibra.__file__).resolve().parent.parent))
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, cond, what: str, timeout: float = 120) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stdout.read().decode()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_at_a_random_layer_then_resume_is_byte_identical(model4, reference, tmp_path):
    k = random.randrange(LAYERS - 1)  # the last layer's checkpoint is followed only by the save
    out = tmp_path / "out"
    work = work_dir(out)
    proc = _spawn(model4, out, "layer", k)
    _wait_for(proc, lambda: (work / f"layer-{k:05d}.json").is_file(), f"layer {k}'s checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must leave no output folder"
    assert sorted(p.name for p in work.glob("layer-*.json")) == [f"layer-{i:05d}.json" for i in range(k + 1)]
    # without --resume the checkpoints are not silently thrown away
    with pytest.raises(ResumeError, match=rf"\({k + 1} layer\(s\) finished\): pass --resume"):
        main(["quantize", "--input", str(model4), "--output", str(out), *ARGS])
    assert main(["quantize", "--input", str(model4), "--output", str(out), *ARGS, "--resume"]) == 0
    assert _hashes(out) == _hashes(reference), f"resumed after layer {k}: output differs"
    assert json.loads((out / "report.json").read_text())["resumed_from_layer"] == k + 1
    assert not work.exists(), "checkpoints are removed once the output is complete"


def test_sigkill_during_the_save_leaves_no_folder_and_the_temp_is_cleaned(model4, reference, tmp_path):
    out = tmp_path / "out"
    proc = _spawn(model4, out, "save")
    tmp_glob = lambda: list(tmp_path.glob(".out.calibra-tmp-*"))  # noqa: E731
    _wait_for(proc, lambda: any((t / "PAUSED").exists() for t in tmp_glob()), "the save")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not out.exists() and len(tmp_glob()) == 1
    assert main(["quantize", "--input", str(model4), "--output", str(out), *ARGS, "--resume"]) == 0
    assert tmp_glob() == [], "the stale temporary folder of the killed run is removed"
    assert _hashes(out) == _hashes(reference)
    assert json.loads((out / "report.json").read_text())["resumed_from_layer"] == LAYERS


# ---------------------------------------------------------------------------------------------- in-process
CAL = dict(num_samples=4, sequence_length=32, min_tokens=16, seed=7)


def _interrupt_after(monkeypatch, layer: int):
    """Stop the run with KeyboardInterrupt right after ``layer``'s checkpoint (what Ctrl-C does)."""
    from calibra.io import checkpoint

    save = checkpoint.LayerCheckpoints.save_layer

    def stop(self, i, *a, **kw):
        save(self, i, *a, **kw)
        if i == layer:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.LayerCheckpoints, "save_layer", stop)


def _q(model, out, cal=None, cfg=None, **kw):
    return calibra.quantize(
        str(model),
        cfg or GPTQConfig(group_size=16),
        cal or CalibrationConfig(**CAL),
        output=out,
        evaluate=False,
        progress=False,
        echo=None,
        **kw,
    )


@pytest.fixture
def partial(model4, tmp_path, monkeypatch):
    """An output whose run stopped after layer 1 (checkpoints of layers 0 and 1)."""
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _q(model4, out)
    monkeypatch.undo()
    assert len(list(work_dir(out).glob("layer-*.json"))) == 2
    return out


def test_resume_refused_for_another_model(partial, model4, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(model4, other)
    sd = load_file(str(other / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] *= 1.5
    save_file(sd, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ResumeError, match=r"cannot resume: the model differs .*value was 'files:"):
        _q(other, partial, resume=True)


def test_resume_refused_for_other_settings(partial, model4):
    with pytest.raises(
        ResumeError, match=r"the config differs from the checkpointed run: quantization\.group_size was 16, now 32"
    ):
        _q(model4, partial, cfg=GPTQConfig(group_size=32), resume=True)
    with pytest.raises(ResumeError, match=r"calibration\.seed was 7, now 8"):
        _q(model4, partial, cal=CalibrationConfig(**dict(CAL, seed=8)), resume=True)


def test_resume_refused_for_another_version(partial, model4, monkeypatch):
    monkeypatch.setattr(calibra, "__version__", "99.0.0")
    with pytest.raises(
        ResumeError, match=r"the versions differ from the checkpointed run: calibra was '.*', now '99\.0\.0'"
    ):
        _q(model4, partial, resume=True)


def test_resume_refused_for_other_data(model4, tmp_path, monkeypatch):
    from calibra.assets import builtin_texts

    data = tmp_path / "cal.txt"
    texts = builtin_texts("code")
    data.write_text("\n\n".join(texts[:60]))
    cal = CalibrationConfig(**dict(CAL, dataset=str(data)))
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 0)
    with pytest.raises(KeyboardInterrupt):
        _q(model4, out, cal=cal)
    monkeypatch.undo()
    data.write_text("\n\n".join(texts[60:120]))  # same file name and settings, other text
    with pytest.raises(ResumeError, match=r"cannot resume: the data differs"):
        _q(model4, out, cal=cal, resume=True)


def test_out_of_memory_names_the_options_and_keeps_finished_layers(model4, reference, tmp_path, monkeypatch):
    """Row 22: OOM at layer 2 -> the message names seq_len, batch size, the offload option and --resume; the
    two finished layers stay checkpointed and the resumed run equals the uninterrupted one."""
    from calibra.quant import apply

    real = apply.LayerQuantizer.__call__

    def oom(self, index, layer, stats):
        if index == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, index, layer, stats)

    monkeypatch.setattr(apply.LayerQuantizer, "__call__", oom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as e:
        main(["quantize", "--input", str(model4), "--output", str(out), *ARGS])
    msg = str(e.value)
    # --batch-size unset: about 4096 tokens per pass, so all 4 samples of 32 tokens go in one batch
    for part in (
        "out of memory",
        "at layer 2",
        "seq_len 32",
        "batch size 4",
        "--batch-size",
        "--seq-len",
        "--device cpu",
        "finished layers are checkpointed",
        "--resume",
    ):
        assert part in msg, f"{part!r} missing from: {msg}"
    assert not out.exists()
    assert sorted(p.name for p in work_dir(out).glob("layer-*.json")) == ["layer-00000.json", "layer-00001.json"]
    monkeypatch.undo()
    assert main(["quantize", "--input", str(model4), "--output", str(out), *ARGS, "--resume"]) == 0
    assert _hashes(out) == _hashes(reference)


def test_other_errors_drop_the_checkpoints(model4, tmp_path, monkeypatch):
    """A deterministic failure would recur on resume: nothing is left behind at all."""
    from calibra.quant import apply

    def bad(self, index, layer, stats):
        raise ValueError("boom")

    monkeypatch.setattr(apply.LayerQuantizer, "__call__", bad)
    with pytest.raises(ValueError, match="boom"):
        _q(model4, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_rtn_resume_is_byte_identical(model4, tmp_path, monkeypatch):
    from calibra.quant import RTNConfig

    cfg = RTNConfig(group_size=16)
    _q(model4, tmp_path / "ref", cfg=cfg)
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _q(model4, tmp_path / "out", cfg=cfg)
    monkeypatch.undo()
    _, report = _q(model4, tmp_path / "out", cfg=cfg, resume=True)
    assert report["resumed_from_layer"] == 2
    assert _hashes(tmp_path / "out") == _hashes(tmp_path / "ref")
