"""Data parallelism on torch.distributed (gloo on the CPU), launched as users launch it:
``torchrun --nproc-per-node 2 -m calibra ...``. Every statistic summed across the ranks must equal the
one-process run's (float64 sums: equal to rounding), counts exactly; one writer."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")


def _env() -> dict:
    import calibra

    env = dict(os.environ)
    # the ranks import the calibra these tests import (installed, or the tree on PYTHONPATH)
    pkg_parent = str(Path(calibra.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"  # two ranks on a two-core machine
    env.pop("WORLD_SIZE", None)
    return env


def _calibra(args: list[str], ranks: int) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, "-m", "calibra", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        cmd += ["-m", "calibra", *args]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _stats(path: Path):
    from calibra.calib import CalibrationStats

    return CalibrationStats.load(path)


@pytest.mark.parametrize("model", ["builtin:tiny-llama", "builtin:tiny-moe"])
def test_calibrate_on_two_ranks_equals_one_process(tmp_path, model):
    """Dense: equal to float64 rounding (each row's float32 activations do not depend on which rows share
    its batch). MoE: an expert's rows are gathered from the batch, and a float32 matmul over other rows
    rounds differently (about 1e-7 relative), so the tolerance is float32's there; the counts are exact."""
    args = ["calibrate", "--input", model, "--samples", "6", "--seq-len", "64", "--seed", "3"]
    args += ["--observers", "hessian,norms,ranges,kv", "--hessian-dtype", "float64"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _calibra([*args, "--output", str(one)], ranks=1)
    _calibra([*args, "--output", str(two)], ranks=2)
    a, b = _stats(one), _stats(two)
    assert sorted(a.tensors) == sorted(b.tensors)
    assert a.counts == b.counts  # tokens per module (and per expert), summed over the ranks
    assert b.metadata["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert a.metadata["token_count"] == b.metadata["token_count"]
    moe = model.endswith("moe")
    tol = 1e-5 if moe else 1e-12
    for name, ta in a.tensors.items():
        tb = b.tensors[name]
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, name
        if "/hist/" in name:  # the same values counted, a value at a bin edge may move one bin with rounding
            assert ta.sum() == tb.sum(), name
            # MoE: only values within the float32 noise above of a bin edge move (one bin each), a few per
            # 10,000 (3 values of an expert on the mixed-domain default text); a wrong combine moves far more
            moved = float((ta - tb).abs().sum()) / 2
            assert moved <= (2e-4 * float(ta.sum()) if moe else 0), (name, moved, float(ta.sum()))
        elif name.startswith("moe/tokens"):
            assert torch.equal(ta, tb), name  # routing of every token is the same
        else:
            torch.testing.assert_close(tb, ta, rtol=tol, atol=tol * float(ta.abs().max()), msg=name)
    if moe:
        assert any(".experts." in n for n in a.tensors)  # per-expert Hessians went through the sum too
    assert any(n.startswith("kv/") for n in a.tensors)  # the K/V covariances (per layer) were summed too


def test_kv_calibrate_on_two_ranks_equals_one_process(tmp_path):
    """``calibra kv calibrate``: the K/V covariances summed over the ranks give the same PCA bases (to float
    rounding of the eigen-decomposition); rank 0 writes the preset."""
    from safetensors.torch import load_file

    args = ["kv", "calibrate", "--input", "builtin:tiny-llama", "--rank", "8", "--targets", "kv"]
    args += ["--samples", "6", "--seq-len", "64", "--no-eval", "--no-progress"]
    _calibra([*args, "--output", str(tmp_path / "one.json")], ranks=1)
    r = _calibra([*args, "--output", str(tmp_path / "two.json")], ranks=2)
    assert r.stdout.count("calibra kv calibrate:") == 1  # one rank prints
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys() and a
    for name, ta in a.items():
        torch.testing.assert_close(b[name], ta, rtol=1e-6, atol=1e-6 * float(ta.abs().max()), msg=name)
    import json

    doc = json.loads((tmp_path / "two.json").read_text())
    assert doc["calibration"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert doc["calibration"]["tokens"] == json.loads((tmp_path / "one.json").read_text())["calibration"]["tokens"]


def test_more_ranks_than_samples_is_refused(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "calibra"]
    cmd += ["calibrate", "--input", "builtin:tiny-llama", "--samples", "1", "--seq-len", "32"]
    cmd += ["--output", str(tmp_path / "s.safetensors")]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "cannot be split over 2 ranks" in r.stdout + r.stderr
    assert not (tmp_path / "s.safetensors").exists()


def test_gptq_on_two_ranks_writes_what_one_process_writes(tmp_path):
    """GPTQ (true-sequential: statistics re-collected group by group, each collection combined) on two
    ranks writes the same quantized tensors, byte for byte, as one process with float64 Hessians."""
    from safetensors.torch import load_file

    args = ["quantize", "--input", "builtin:tiny-llama", "--method", "gptq", "--samples", "6", "--seq-len", "64"]
    args += ["--no-eval", "--no-progress", "--hessian-dtype", "float64"]
    _calibra([*args, "--output", str(tmp_path / "one")], ranks=1)
    r = _calibra([*args, "--output", str(tmp_path / "two")], ranks=2)
    a = load_file(tmp_path / "one" / "quantized.safetensors")
    b = load_file(tmp_path / "two" / "quantized.safetensors")
    assert a.keys() == b.keys()
    assert [n for n in a if not torch.equal(a[n], b[n])] == []
    import json

    report = json.loads((tmp_path / "two" / "report.json").read_text())
    dist = report["settings"]["distributed"]
    assert (dist["world_size"], dist["backend"]) == (2, "gloo")
    # the solves were split (q/k/v, gate/up across ranks; each result broadcast from its owner)
    assert sum(dist["solves_per_rank"]) == report["summary"]["quantized_modules"]
    assert min(dist["solves_per_rank"]) > 0
    # each rank's time and peak memory, gathered to the writer
    assert len(dist["per_rank"]) == 2
    assert all(r["peak_rss"] > 0 and 0 < r["layer_seconds"] < r["seconds"] for r in dist["per_rank"])
    assert report["settings"]["hessian_dtype"] == "float64"
    assert r.stdout.count("modules quantized") == 1  # one rank prints the summary


def test_streamed_gptq_on_two_ranks_writes_what_one_process_writes(tmp_path):
    """Streamed (each rank reads one layer at a time from the shards; rank 0 writes): the same bytes."""
    from safetensors.torch import load_file

    args = ["quantize", "--input", "builtin:tiny-llama", "--method", "gptq", "--samples", "4", "--seq-len", "64"]
    args += ["--no-eval", "--no-progress", "--hessian-dtype", "float64", "--stream"]
    _calibra([*args, "--output", str(tmp_path / "one")], ranks=1)
    _calibra([*args, "--output", str(tmp_path / "two")], ranks=2)
    one, two = sorted((tmp_path / "one").glob("*.safetensors")), sorted((tmp_path / "two").glob("*.safetensors"))
    assert [f.name for f in one] == [f.name for f in two] and one
    for fa, fb in zip(one, two):
        a, b = load_file(fa), load_file(fb)
        assert a.keys() == b.keys()
        assert [n for n in a if not torch.equal(a[n], b[n])] == [], fa.name


def test_a_refusal_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 holds the checkpoints; when it refuses (here: an earlier run's checkpoints without --resume),
    every rank stops with the reason instead of waiting in a collective."""
    from calibra.io.checkpoint import work_dir

    out = tmp_path / "q"
    work = work_dir(out)
    work.mkdir()
    (work / "layer-00000.json").write_text("{}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "calibra"]
    cmd += ["quantize", "--input", "builtin:tiny-llama", "--method", "rtn", "--no-eval", "--output", str(out)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=dict(_env(), CALIBRA_DIST_TIMEOUT="900"), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 300, "no rank waited for the collective timeout"
    assert "(rank 0 of 2)" in r.stderr and "pass --resume" in r.stderr
    # rank 1 stops with rank 0's reason, unless torchrun has stopped it first (rank 0 exited)
    assert "rank 0 failed: ResumeError" in r.stderr or "SIGTERM" in r.stderr
    assert not out.exists() and (work / "layer-00000.json").exists()


def _one_and_two_ranks_write_the_same(tmp_path, args: list[str]) -> dict:
    """Run ``args`` in one process and on two ranks; every file but the report must be byte-identical.
    Returns the two-rank run's report."""
    import json

    one, two = tmp_path / "one", tmp_path / "two"
    _calibra([*args, "--output", str(one)], ranks=1)
    _calibra([*args, "--output", str(two)], ranks=2)
    files = sorted(p.name for p in one.iterdir() if not p.name.startswith("report."))
    assert files == sorted(p.name for p in two.iterdir() if not p.name.startswith("report."))
    assert any(f.endswith(".safetensors") for f in files)
    assert [f for f in files if (one / f).read_bytes() != (two / f).read_bytes()] == []
    return json.loads((two / "report.json").read_text())


PRUNE = ["--input", "builtin:tiny-llama", "--samples", "6", "--seq-len", "64", "--no-eval", "--no-progress"]


def test_wanda_on_two_ranks_prunes_what_one_process_prunes(tmp_path):
    """Wanda's channel norms are float64 sums in every run: two ranks keep exactly the same weights."""
    report = _one_and_two_ranks_write_the_same(tmp_path, ["prune", *PRUNE, "--method", "wanda", "--pattern", "2:4"])
    assert min(report["settings"]["distributed"]["solves_per_rank"]) > 0  # the modules were split over the ranks


def test_sparsegpt_on_two_ranks_prunes_what_one_process_prunes(tmp_path):
    """SparseGPT with float64 Hessians (--hessian-dtype float64 in the one-process run; always under
    torchrun): the same mask and the same compensated weights, byte for byte."""
    args = ["prune", *PRUNE, "--method", "sparsegpt", "--sparsity", "0.5", "--hessian-dtype", "float64"]
    settings = _one_and_two_ranks_write_the_same(tmp_path, args)["settings"]
    assert settings["hessian_dtype"] == "float64"
    assert min(settings["distributed"]["solves_per_rank"]) > 0


@pytest.mark.parametrize(
    "options",
    [
        ["--method", "rtn", "--act-ranges"],
        ["--method", "gptq", "--mixed-precision", "4.5", "--hessian-dtype", "float64"],
    ],
    ids=["act-ranges", "mixed-precision"],
)
def test_quantize_options_with_a_calibration_pass_of_their_own(tmp_path, options):
    """Activation ranges (+ SmoothQuant folding) and mixed precision's sensitivity pass combine their
    statistics across the ranks too: the same ranges file, the same promoted modules, the same bytes."""
    report = _one_and_two_ranks_write_the_same(tmp_path, ["quantize", *PRUNE, *options])
    assert report["settings"]["distributed"]["world_size"] == 2


def _codes_differing(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(a / "quantized.safetensors"), load_file(b / "quantized.safetensors")
    names = [n for n in ta if n.endswith(".codes")]
    return sum(int((ta[n] != tb[n]).sum()) for n in names) / sum(ta[n].numel() for n in names)


def test_moe_gptq_on_two_ranks_differs_no_more_than_another_batch_size(tmp_path):
    """builtin:tiny-moe: the experts' float32 forward rounds differently with the batch's composition (the
    rows an expert gathers), and GPTQ on an expert Hessian of fewer tokens than columns turns those last
    bits into other codes -- so two ranks cannot be byte-identical to one process here. What must hold:
    the ranks change no more codes than one process does with another batch size (docs/distributed.md:
    4.2% vs 4.0% measured), the non-expert modules of the first layer are identical, and so is its routing."""
    import json

    args = ["quantize", "--input", "builtin:tiny-moe", "--method", "gptq", "--samples", "8", "--seq-len", "64"]
    args += ["--no-eval", "--no-progress", "--hessian-dtype", "float64"]
    one, other_batch, two = tmp_path / "one", tmp_path / "batch4", tmp_path / "two"
    _calibra([*args, "--output", str(one)], ranks=1)
    _calibra([*args, "--batch-size", "4", "--output", str(other_batch)], ranks=1)
    _calibra([*args, "--output", str(two)], ranks=2)
    control, ranks = _codes_differing(one, other_batch), _codes_differing(one, two)
    assert 0 < control < 0.2 and ranks <= 1.5 * control, (ranks, control)
    from safetensors.torch import load_file

    a, b = load_file(one / "quantized.safetensors"), load_file(two / "quantized.safetensors")
    first_layer = [n for n in a if n.startswith("model.layers.0.") and ".experts." not in n]
    assert first_layer and all(torch.equal(a[n], b[n]) for n in first_layer)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
    # the first layer's inputs are the same on both: each expert's token count, summed over the ranks, is
    # the one process's (deeper layers route the slightly different quantized outputs of the layers before)
    first = [
        [(c["expert"], c["tokens"]) for c in r["moe_coverage"] if c["block"] == "model.layers.0.mlp"] for r in (ra, rb)
    ]
    assert first[0] and first[0] == first[1]


def test_router_guided_selection_on_two_ranks_selects_what_one_process_selects(tmp_path):
    """``calibrate --moe-quota``: each rank routes its share of the candidate pool, the per-sample counts are
    exchanged, and every rank selects the same samples as one process (then splits them)."""
    args = ["calibrate", "--input", "builtin:tiny-moe", "--observers", "hessian", "--samples", "2"]
    args += ["--seq-len", "64", "--moe-quota", "3", "--hessian-dtype", "float64", "--no-progress"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    _calibra([*args, "--output", str(one)], ranks=1)
    _calibra([*args, "--output", str(two)], ranks=2)
    a, b = _stats(one), _stats(two)
    picked = a.metadata["runs"][0]["selected_indices"]
    assert 2 < len(picked) < a.metadata["runs"][0]["selected_from_pool"]  # some candidates added, not all
    assert b.metadata["runs"][0]["selected_indices"] == picked
    assert a.counts == b.counts
