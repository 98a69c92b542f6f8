"""``--resume`` of a distributed job (issue 19): a rank killed mid-job makes the others exit (no hang), the
finished layers stay checkpointed, and the same ``torchrun`` command with ``--resume`` writes what an
uninterrupted run writes, byte for byte. A resume with another world size is refused, naming both."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.distributed.test_data_parallel import _calibra, _env

pytest.importorskip("transformers")

GPTQ = ["quantize", "--input", "builtin:tiny-llama", "--method", "gptq", "--samples", "6", "--seq-len", "64"]
GPTQ += ["--no-eval", "--no-progress", "--hessian-dtype", "float64"]
SPARSEGPT = ["prune", "--input", "builtin:tiny-llama", "--method", "sparsegpt", "--sparsity", "0.5"]
SPARSEGPT += ["--samples", "6", "--seq-len", "64", "--no-eval", "--no-progress"]


def _work(out: Path) -> Path:
    from calibra.io.checkpoint import work_dir

    return work_dir(out)


def _hashes(folder: Path) -> dict:
    """sha256 of every file but the report (its timings differ per run)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.name not in ("report.json", "report.html")
    }


def _killed_run(tmp_path: Path, args: list[str], after_layer: int) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` of ``args`` where rank 1 kills itself (SIGKILL) right after layer
    ``after_layer`` is committed; rank 0 is left in the next collective."""
    script = tmp_path / "killed_rank.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, sys
        from calibra.jobs import distributed
        save = distributed.SharedCheckpoints.save_layer
        def save_then_die(self, i, *a, **kw):
            save(self, i, *a, **kw)
            if i == {after_layer} and self.world.rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        distributed.SharedCheckpoints.save_layer = save_then_die
        from calibra.cli import main
        sys.exit(main(sys.argv[1:]))
        """)
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "args",
    [GPTQ, [*GPTQ, "--stream"], SPARSEGPT],
    ids=["gptq", "gptq-streamed", "sparsegpt"],
)
def test_a_killed_rank_then_resume_writes_what_an_uninterrupted_run_writes(tmp_path, args):
    ref, out = tmp_path / "ref", tmp_path / "out"
    _calibra([*args, "--output", str(ref)], ranks=2)
    killed = _killed_run(tmp_path, [*args, "--output", str(out)], after_layer=0)
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr  # torchrun names the rank that died
    assert not out.exists(), "no partial output at the final path"
    work = _work(out)
    assert (work / "layer-00000.json").is_file()
    doc = json.loads((work / "layer-00000.json").read_text())
    if "hidden_sha256" in doc:  # each rank's inputs of the next layer, in rank order
        assert len(doc["extra"]["hidden_per_rank"]) == 2
    r = _calibra([*args, "--output", str(out), "--resume"], ranks=2)
    assert "resuming: 1 finished layer(s)" in r.stdout + r.stderr
    assert _hashes(out) == _hashes(ref)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_layer"] == 1
    assert report["settings"]["distributed"]["world_size"] == 2
    assert not work.exists(), "the checkpoints are removed once the output is complete"


def test_resume_with_another_world_size_is_refused(tmp_path):
    out = tmp_path / "out"
    killed = _killed_run(tmp_path, [*GPTQ, "--output", str(out)], after_layer=0)
    assert killed.returncode != 0 and (_work(out) / "layer-00000.json").is_file()
    cmd = [sys.executable, "-m", "calibra", *GPTQ, "--output", str(out), "--resume"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "world_size was 2, now 1" in r.stderr
    assert (_work(out) / "layer-00000.json").is_file(), "a refused resume keeps the checkpoints"
    assert not out.exists()
