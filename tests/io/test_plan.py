"""The memory planner: --dry-run prints the plan and loads nothing; the placement follows the free device
memory; and the predicted peak host memory is within 25% of the measured peak RSS of the real job."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from calibra.cli import main
from calibra.jobs.plan import plan_job


@pytest.mark.parametrize(
    "verb,extra", [("quantize", ["--method", "gptq"]), ("prune", ["--method", "sparsegpt"]), ("calibrate", [])]
)
def test_dry_run_prints_the_plan_and_loads_nothing(verb, extra, tmp_path, capsys, no_load):
    out = tmp_path / ("out.safetensors" if verb == "calibrate" else "out")
    assert (
        main(
            [
                verb,
                "--input",
                "builtin:tiny-llama",
                "--output",
                str(out),
                "--samples",
                "8",
                "--seq-len",
                "64",
                "--dry-run",
                *extra,
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    for part in (f"[plan] {verb}", "placement", "peak device memory", "peak host memory", "disk: output"):
        assert part in text
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_placement_follows_free_device_memory(monkeypatch):
    from transformers import AutoConfig

    from calibra.assets import resolve_model
    from calibra.data import CalibrationConfig
    from calibra.jobs import plan

    cfg = AutoConfig.from_pretrained(resolve_model("builtin:tiny-llama"))
    cal = CalibrationConfig(num_samples=8, sequence_length=64)
    kw = dict(job="quantize", calibration=cal, device="cuda", solver="gptq", baseline_rss=0)
    monkeypatch.setattr(plan, "device_free", lambda d: 2**34)
    big = plan_job(cfg, **kw)
    assert big.placement == "whole model on cuda" and big.peak_device > big.model_bytes
    monkeypatch.setattr(plan, "device_free", lambda d: int(big.peak_device * 0.8))
    small = plan_job(cfg, **kw)
    assert small.offload and small.peak_device < big.peak_device - small.model_bytes // 2 and not small.warnings
    monkeypatch.setattr(plan, "device_free", lambda d: small.peak_device // 2)
    assert "exceeds the free device memory" in plan_job(cfg, **kw).warnings[0]
    # the device working set grows with the batch; the host peak with the samples
    one, eight = (
        plan_job(cfg, **dict(kw, calibration=CalibrationConfig(num_samples=8, sequence_length=256, batch_size=b)))
        for b in (1, 8)
    )
    assert eight.peak_device > one.peak_device
    assert (
        plan_job(cfg, **dict(kw, calibration=CalibrationConfig(num_samples=64, sequence_length=64))).peak_host
        > small.peak_host
    )


def test_predicted_peak_host_memory_within_25_percent(tmp_path):
    """The README table's measurement (benchmarks/bench_memory_plan.py), in fresh processes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        import bench_memory_plan as bench
    finally:
        sys.path.pop(0)
    cases = [
        ("builtin:tiny-llama", 16, 128),
        ("builtin:tiny-moe", 16, 128),
        (str(bench.build_h2048(tmp_path / "h2048", layers=1)), 8, 128),
    ]
    for spec, samples, seq_len in cases:
        t0 = time.time()
        r = bench.measure(spec, samples, seq_len, tmp_path / f"out-{Path(spec).name.replace(':', '-')}")
        print(f"{spec}: predicted/measured {r['ratio']:.3f} ({time.time() - t0:.1f} s)")
        assert 0.75 <= r["ratio"] <= 1.25, (spec, r)
