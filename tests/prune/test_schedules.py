"""Schedules vs their formulas, the stage machine, the training-loop mask callback, data-only gradual mode."""

import pytest
import torch
from torch import nn

from calibra.prune import (
    Cubic,
    Gradual,
    LayerStats,
    MaskCallback,
    OneShot,
    PruningConfig,
    PruningStage,
    StageTracker,
    gradual_sparsities,
    prune_gradually,
    prune_weight,
)
from calibra.prune.patterns import prune_count

from ._layers import layer, output_error


def test_oneshot():
    s = OneShot(step=5, sparsity=0.6).validate()
    assert [s.sparsity_at_step(t) for t in (0, 4, 5, 6, 1000)] == [0.0, 0.0, 0.6, 0.6, 0.6]
    assert [t for t in range(20) if s.is_prune_step(t)] == [5] == s.prune_steps()


@pytest.mark.parametrize("t", [0, 99, 100, 101, 150, 199, 200, 333, 550, 899, 900, 901, 5000])
def test_gradual_formula(t):
    g = Gradual(start_step=100, end_step=900, initial_sparsity=0.1, final_sparsity=0.7, frequency=50).validate()
    if t < 100:
        want = 0.0
    elif t >= 900:
        want = 0.7
    else:
        k = (t - 100) // 50 * 50
        want = 0.1 + (0.7 - 0.1) * k / 800
    assert g.sparsity_at_step(t) == pytest.approx(want, abs=1e-15)


@pytest.mark.parametrize("t", [0, 9, 10, 11, 20, 35, 60, 109, 110, 111, 400])
def test_cubic_formula_zhu_gupta(t):
    """s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3 at update steps t0 + j dt; held in between."""
    s_i, s_f, t0, n, dt = 0.2, 0.9, 10, 20, 5
    c = Cubic(start_step=t0, end_step=t0 + n * dt, initial_sparsity=s_i, final_sparsity=s_f, frequency=dt).validate()
    if t < t0:
        want = 0.0
    else:
        tu = min(t0 + (t - t0) // dt * dt, t0 + n * dt)  # last update step
        want = s_f + (s_i - s_f) * (1 - (tu - t0) / (n * dt)) ** 3
    assert c.sparsity_at_step(t) == pytest.approx(want, abs=1e-15)


def test_ramp_prune_steps_and_monotone():
    c = Cubic(start_step=0, end_step=100, final_sparsity=0.8, frequency=30)
    assert c.prune_steps() == [0, 30, 60, 90, 100]
    assert [t for t in range(200) if c.is_prune_step(t)] == c.prune_steps()
    vals = [c.sparsity_at_step(t) for t in range(0, 120)]
    assert vals == sorted(vals) and vals[0] == 0.0 and vals[-1] == 0.8
    # cubic prunes faster than linear early on
    g = Gradual(start_step=0, end_step=100, final_sparsity=0.8, frequency=30)
    assert c.sparsity_at_step(30) > g.sparsity_at_step(30)


def test_stage_machine_happy_path_and_timestamps():
    clock = iter(range(100)).__next__
    seen = []
    tr = StageTracker(on_change=lambda old, new, t: seen.append((old.value, new.value)), clock=lambda: float(clock()))
    for st in (
        "calibrating",
        "computing_importance",
        "pruning",
        "calibrating",
        "computing_importance",
        "pruning",
        "fine_tuning",
        "evaluating",
        "exporting",
        "complete",
    ):
        tr.advance(st)
    assert tr.stage is PruningStage.COMPLETE and tr.done
    assert seen[0] == ("idle", "calibrating") and seen[-1] == ("exporting", "complete")
    d = tr.to_dict()
    assert [h["stage"] for h in d["history"]][:3] == ["idle", "calibrating", "computing_importance"]
    assert all(h["ended"] is not None and h["ended"] >= h["started"] for h in d["history"])
    assert d["seconds"]["calibrating"] == 2.0  # two visits of one clock tick each
    with pytest.raises(ValueError, match="already complete"):
        tr.fail("late")


def test_stage_machine_rejects_and_fails():
    tr = StageTracker()
    tr.advance(PruningStage.COMPUTING_IMPORTANCE)  # magnitude: no calibration
    with pytest.raises(ValueError, match=r"invalid stage transition computing_importance -> exporting; .* pruning"):
        tr.advance("exporting")
    with pytest.raises(ValueError, match="fail"):
        tr.advance("failed")
    with pytest.raises(ValueError):
        tr.advance("bogus")
    tr.fail("[sparsegpt] Hessian of x not positive definite")
    assert tr.stage is PruningStage.FAILED and tr.reason.startswith("[sparsegpt]")
    assert tr.to_dict()["history"][-1]["detail"] == tr.reason
    with pytest.raises(ValueError):
        tr.advance("pruning")


def test_mask_callback_keeps_zeros_through_optimizer_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    cfg = PruningConfig(
        method="magnitude",
        target_sparsity=0.75,
        scope="row",
        schedule=Cubic(start_step=2, end_step=20, initial_sparsity=0.0, frequency=6),
    )
    cb = MaskCallback(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(256, 32), torch.randn(256, 8)
    prev = None
    for step in range(30):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()  # AdamW moves pruned weights off zero (momentum, decay)
        cb.on_step(step, model)
        want = cfg.resolved_schedule().sparsity_at_step(step)
        for name, mod in cb.targets(model):
            w = mod.weight
            if step >= 2:
                keep = cb.masks[name]
                assert bool((w[~keep] == 0).all()), step
                assert bool(((~keep).sum(1) == prune_count(w.shape[1], want)).all()), step
        if prev is not None:  # masks only grow
            for name in prev:
                assert bool((prev[name] | ~cb.masks[name]).all())  # pruned before -> pruned now
        prev = {k: v.clone() for k, v in cb.masks.items()}
    assert [t for t, _ in cb.history] == [2, 8, 14, 20]
    assert cb.sparsity == 0.75
    for _, mod in cb.targets(model):
        assert float((mod.weight == 0).float().mean()) >= 0.75


def test_mask_callback_skips_or_names_indivisible():
    model = nn.Sequential(nn.Linear(12, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="in_features divisible by 8"):
        MaskCallback(PruningConfig(method="magnitude", pattern="4:8", target_sparsity=None)).on_step(0, model)
    cb = MaskCallback(PruningConfig(method="magnitude", pattern="4:8", target_sparsity=None, skip_indivisible=True))
    cb.on_step(0, model)
    assert list(cb.masks) == ["1"] and bool((model[1].weight.reshape(4, 1, 8) != 0).sum(-1).le(4).all())


def test_gradual_sparsities():
    s = gradual_sparsities(0.6, 4)
    assert s == pytest.approx([0.6 * (1 - (1 - j / 4) ** 3) for j in (1, 2, 3, 4)])
    assert s[-1] == pytest.approx(0.6) and s == sorted(s)
    assert gradual_sparsities(0.5, 1) == [0.5]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_data_only_gradual(method):
    """k steps, statistics recomputed by the callback before each, nested masks, exact final sparsity."""
    w, x = layer(32, 128, 12)
    calls = []

    def recalibrate(step, current):
        calls.append((step, float((current == 0).float().mean())))
        # the runner would rerun the model up to this layer; the inputs here drift a little per step
        return LayerStats.from_inputs(x * (1.0 + 0.01 * step))

    cfg = PruningConfig(method=method, target_sparsity=0.6, gradual_steps=4)
    r = prune_gradually(w, cfg, recalibrate)
    assert [c[0] for c in calls] == [0, 1, 2, 3] and calls[0][1] == 0.0
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)
    steps = r.extra["gradual_steps"]
    assert [s["sparsity"] for s in steps] == pytest.approx(gradual_sparsities(0.6, 4))
    total = prune_count(w.numel(), 0.6)
    if method == "wanda":
        assert bool(((~r.mask).sum(1) == prune_count(128, 0.6)).all())
    else:
        assert int((~r.mask).sum()) == total
    assert bool((r.weight[~r.mask] == 0).all()) and r.target_sparsity == 0.6
    # gradual SparseGPT stays well ahead of one-shot magnitude
    mag = prune_weight(w, PruningConfig(method="magnitude", target_sparsity=0.6), LayerStats.from_inputs(x))
    if method != "magnitude":
        assert output_error(w, r.weight, x) < output_error(w, mag.weight, x)


def test_gradual_nested_masks():
    w, x = layer(16, 64, 13)
    masks = []

    def recalibrate(step, current):
        masks.append(current != 0)
        return LayerStats.from_inputs(x)

    prune_gradually(w, PruningConfig(method="sparsegpt", target_sparsity=0.7), recalibrate, steps=3)
    for a, b in zip(masks[1:], masks[2:]):
        assert bool((a | ~b).all())  # zero before -> zero after


def test_gradual_refuses_fixed_pattern():
    w, x = layer(8, 32, 0)
    with pytest.raises(ValueError, match="fixes the sparsity"):
        prune_gradually(
            w, PruningConfig(pattern="2:4", target_sparsity=None), lambda s, c: LayerStats.from_inputs(x), steps=2
        )
