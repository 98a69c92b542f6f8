"""Statistics file (round trip, exact merge), range histograms, MoE coverage, shrinkage, selection."""

from __future__ import annotations

import math

import pytest
import torch

from calibra.calib import (
    CalibrationStats,
    LayerRunner,
    coverage_table,
    merge,
    percentile,
    refresh_coverage,
    select_samples_for_coverage,
    shrunk_hessian,
)
from calibra.calib.observers import RangeObserver
from tests.calib._tiny import batch, build

pytest.importorskip("transformers")
OBS = ("hessian", "norms", "ranges", "kv")


def _run(model, ids, mask, bs, **kw):
    return LayerRunner(model, device="cpu", progress=False, observers=OBS, hessian_dtype=torch.float64, **kw).run(
        ids, mask, batch_size=bs
    )


@pytest.mark.parametrize("arch", ["qwen3", "qwen2_moe"])
def test_merge_of_two_half_runs_equals_one_full_run(arch):
    model = build(arch)
    ids, mask = batch(S=4, L=12, lengths=[12, 9, 12, 7])
    full = _run(model, ids, mask, 2)  # two batches: [0, 1], [2, 3]
    a, b = _run(model, ids[:2], mask[:2], 2), _run(model, ids[2:], mask[2:], 2)
    merged = merge(a, b)
    assert merged.counts == full.counts and set(merged.tensors) == set(full.tensors)
    assert merged.token_count == full.token_count == int(mask.sum())
    for k, v in full.tensors.items():
        # fp64 sums: each half is one accumulation step, so the merged sum is the same additions in
        # the same order -> bitwise equal; min/max/histograms/counts are exact by construction
        assert torch.equal(merged.tensors[k], v), k


def test_stats_file_round_trip_and_refusals(tmp_path):
    model = build("mixtral")
    ids, mask = batch(S=2, L=8)
    st = _run(model, ids, mask, 2)
    st.metadata["moe"].update(quota=4, tau=16.0)
    refresh_coverage(st)
    path = st.save(tmp_path / "stats.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["stats.safetensors"]  # no temp file left behind
    back = CalibrationStats.load(path)
    assert back.counts == st.counts and back.metadata["model"] == st.metadata["model"]
    assert set(back.tensors) == set(st.tensors)
    assert all(torch.equal(back.tensors[k], v) for k, v in st.tensors.items())
    assert back.metadata["moe"]["coverage"] == st.metadata["moe"]["coverage"]
    other = _run(build("mixtral", seed=5), ids, mask, 2)
    with pytest.raises(ValueError, match=r"\[stats\] cannot merge statistics of different model"):
        merge(st, other)
    fp32 = LayerRunner(model, device="cpu", progress=False, observers=OBS).run(ids, mask, batch_size=2)
    with pytest.raises(ValueError, match="different hessian dtype"):
        merge(st, fp32)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        CalibrationStats.load(bad)


def test_range_histogram_percentiles_and_exact_merge():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 8, generator=g) * 3
    one, two = RangeObserver(), RangeObserver()
    one.linear("m", x)
    two.linear("m", x[:1500])
    two.linear("m", x[1500:])
    assert all(torch.equal(one.tensors[k], two.tensors[k]) for k in one.tensors)
    torch.testing.assert_close(one.tensors["ranges/max/m"], x.amax(0))
    hist = one.tensors["ranges/hist/m"]
    assert int(hist.sum()) == x.numel()
    for q in (1, 25, 50, 99, 99.9):
        exact = torch.quantile(x.reshape(-1), q / 100).item()
        got = percentile(hist, q)
        # within one bin (2^(1/16) relative) of the exact quantile, on the far-from-zero side
        assert abs(got - exact) <= 0.05 * abs(exact) + 1e-3, (q, got, exact)


def test_expert_without_tokens_gets_pooled_hessian_and_is_reported(capsys):
    model = build("mixtral", num_experts_per_tok=1)
    for layer in model.model.layers:  # router rows v, -v, 0, 0 with top-1: experts 2 and 3 never win
        gate = layer.mlp.gate
        gate.top_k = 1
        with torch.no_grad():
            v = torch.randn(64)
            gate.weight.zero_()
            gate.weight[0], gate.weight[1] = v, -v
    ids, mask = batch(S=2, L=12)
    st = _run(model, ids, mask, 2)
    st.metadata["moe"].update(quota=8, tau=32.0)
    rows = refresh_coverage(st)
    print(coverage_table(st))
    out = capsys.readouterr().out
    assert "MoE coverage" in out and "MISS" in out and "saw no token" in out
    dead = [r for r in rows if r["expert"] in (2, 3)]
    assert all(r["tokens"] == 0 and r["lambda"] == 1.0 and r["quota_met"] is False for r in dead)
    for e in range(4):
        H = st.hessian(f"model.layers.0.mlp.experts.{e}.down_proj")
        assert torch.isfinite(H).all()
    key0 = "model.layers.0.mlp.experts.0.gate_up_proj"
    n0, n1 = st.count("hessian", key0), st.count("hessian", key0.replace(".0.gate", ".1.gate"))
    pooled = (st.tensors[f"hessian/sum/{key0}"] + st.tensors[f"hessian/sum/{key0.replace('.0.gate', '.1.gate')}"]) / (
        n0 + n1
    )
    torch.testing.assert_close(st.hessian(key0.replace(".0.gate", ".2.gate")), pooled)
    H0, lam = shrunk_hessian(st, key0)
    assert math.isclose(lam, 32.0 / (n0 + 32.0))
    torch.testing.assert_close(H0, (1 - lam) * st.tensors[f"hessian/sum/{key0}"] / n0 + lam * pooled)


def test_router_guided_selection_reaches_quota_under_normal_routing():
    model = build("qwen3_moe")
    ids, mask = batch(S=24, L=10, seed=3)
    quota = 30
    sel = select_samples_for_coverage(model, ids, mask, quota=quota, base=2, device="cpu", batch_size=4)
    assert sel.indices[:2] == [0, 1] and sel.indices == sorted(sel.indices)
    # independent check: a normal calibration run on exactly the selected samples
    idx = torch.tensor(sel.indices)
    st = LayerRunner(model, device="cpu", progress=False).run(ids[idx], mask[idx], batch_size=4)
    for block, tokens in sel.tokens.items():
        assert torch.equal(st.tensors[f"moe/tokens/{block}"], tokens)
    if not sel.missed:
        assert all(bool((t >= quota).all()) for t in sel.tokens.values())
        assert len(sel.indices) < 24  # stopped early, did not take the whole pool
    unreachable = select_samples_for_coverage(model, ids, mask, quota=10**6, base=2, device="cpu", batch_size=4)
    assert len(unreachable.missed) == 2 * 4 and "below quota" in unreachable.summary()
