"""On Apple Silicon the planner treats host and device memory as one pool (issue 24)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def test_mps_plan_is_one_unified_pool(monkeypatch):
    from transformers import AutoConfig

    from calibra.assets import resolve_model
    from calibra.data import CalibrationConfig
    from calibra.jobs import plan

    cfg = AutoConfig.from_pretrained(resolve_model("builtin:tiny-llama"))
    kw = dict(job="quantize", calibration=CalibrationConfig(num_samples=8, sequence_length=64), solver="gptq")
    monkeypatch.setattr(plan, "device_free", lambda d: 2**34)
    monkeypatch.setattr(plan, "host_available", lambda: 2**34)
    p = plan.plan_job(cfg, device="mps", baseline_rss=0, **kw)
    # never "offloaded to host memory": there is no other memory to offload to
    assert p.placement.startswith("whole model on mps (unified memory") and not p.offload
    assert p.peak_device > p.model_bytes and not p.warnings
    # host and device peaks are counted against the one pool: together they exceed it, each alone does not
    both = p.peak_host + p.peak_device
    monkeypatch.setattr(plan, "host_available", lambda: both - 1)
    p = plan.plan_job(cfg, device="mps", baseline_rss=0, **kw)
    assert any("unified memory" in w for w in p.warnings), p.warnings
    # the same numbers on CUDA are two separate memories: no such warning
    p = plan.plan_job(cfg, device="cuda", baseline_rss=0, **kw)
    assert not any("unified memory" in w for w in p.warnings)
