"""Magnitude / Wanda masks: exact N:M counts, achieved sparsity = target to rounding, determinism,
block tiles, dead channels, 2:4 compressed form."""

import pytest
import torch

from calibra.ops import decompress_24, native_ops, trace
from calibra.prune import LayerStats, PruningConfig, prune_magnitude, prune_wanda, prune_weight
from calibra.prune.patterns import prune_count

from ._layers import correlated_inputs, layer


def _nm_groups_ok(keep: torch.Tensor, n: int, m: int) -> bool:
    return bool((keep.reshape(keep.shape[0], -1, m).sum(-1) == n).all())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_every_nm_group_holds_exactly_n(method, n, m):
    w, x = layer(32 if method == "sparsegpt" else 96, 128, seed=n * m)
    r = prune_weight(
        w, PruningConfig(method=method, pattern=f"{n}:{m}", target_sparsity=None), LayerStats.from_inputs(x)
    )
    assert _nm_groups_ok(r.mask, n, m)
    assert bool((r.weight[~r.mask] == 0).all())
    assert r.achieved_sparsity == pytest.approx(1 - n / m, abs=1e-12)


def test_nm_runs_the_native_op():
    w, x = layer(64, 256, seed=1)
    with trace() as t:
        prune_wanda(w, LayerStats.from_inputs(x).channel_sumsq, PruningConfig(pattern="2:4", target_sparsity=None))
    want = {"cpu"} if "nm_mask" in native_ops("cpu") else {"ref"}
    assert t.impls("nm_mask") == want


@pytest.mark.parametrize("s", [0.1, 0.37, 0.5, 0.73, 0.9])
@pytest.mark.parametrize("width", [64, 200, 511])
def test_wanda_row_sparsity_exact(s, width):
    """Wanda compares within each output row: every row loses exactly round(s * in) weights."""
    w, x = layer(48, width, seed=width)
    r = prune_wanda(w, LayerStats.from_inputs(x, hessian=False).channel_sumsq, PruningConfig(target_sparsity=s))
    assert bool(((~r.mask).sum(1) == prune_count(width, s)).all())
    assert r.achieved_sparsity == pytest.approx(prune_count(width, s) / width, abs=1e-12)


@pytest.mark.parametrize("s", [0.1, 0.37, 0.5, 0.9])
def test_magnitude_layer_sparsity_exact_and_global(s):
    """Magnitude (scope layer) prunes exactly round(s * numel) and everything it keeps outranks
    everything it prunes, across rows."""
    w, _ = layer(77, 130, seed=3)
    r = prune_magnitude(w, PruningConfig(method="magnitude", target_sparsity=s))
    assert int((~r.mask).sum()) == prune_count(w.numel(), s)
    assert float(w.abs()[r.mask].min()) >= float(w.abs()[~r.mask].max())
    rows = prune_magnitude(w, PruningConfig(method="magnitude", target_sparsity=s, scope="row"))
    assert bool(((~rows.mask).sum(1) == prune_count(130, s)).all())


def test_magnitude_square_matches_abs_elementwise_but_not_for_blocks():
    w, _ = layer(64, 64, seed=4)
    a = prune_magnitude(w, PruningConfig(method="magnitude"))
    b = prune_magnitude(w, PruningConfig(method="magnitude", magnitude_score="square"))
    assert torch.equal(a.mask, b.mask)
    w2 = torch.zeros(4, 4)
    w2[:2, :2] = torch.tensor([[3.0, 0.0], [0.0, 0.0]])  # L1 3, L2^2 9
    w2[:2, 2:] = 1.6  # L1 6.4, L2^2 10.24
    w2[2:, :2] = torch.tensor([[2.9, 0.0], [0.0, 0.0]])  # L1 2.9, L2^2 8.41: pruned either way
    w2[2:, 2:] = 0.01
    keep_abs = prune_magnitude(w2, PruningConfig(method="magnitude", pattern="block:2", target_sparsity=0.75)).mask
    assert bool(keep_abs[0, 2]) and not bool(keep_abs[0, 0])  # L1: the flat tile wins
    w2[:2, 2:] = 1.45  # L1 5.8, L2^2 8.41 < 9
    keep_sq = prune_magnitude(
        w2, PruningConfig(method="magnitude", pattern="block:2", target_sparsity=0.75, magnitude_score="square")
    ).mask
    assert bool(keep_sq[0, 0]) and not bool(keep_sq[0, 2])  # squared norm: the spiky tile wins


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("scope", ["layer", "row"])
def test_block_tiles_whole_and_exact(method, scope):
    w, x = layer(64, 96, seed=5)
    cfg = PruningConfig(method=method, pattern="block:8x4", target_sparsity=0.6, scope=scope)
    r = prune_weight(w, cfg, LayerStats.from_inputs(x, hessian=False))
    tiles = r.mask.reshape(8, 8, 24, 4)
    assert bool((tiles.all(3).all(1) | (~tiles).all(3).all(1)).all())  # each tile all kept or all pruned
    pruned_tiles = ~tiles.all(3).all(1)
    if scope == "layer":
        assert int(pruned_tiles.sum()) == prune_count(8 * 24, 0.6)
    else:
        assert bool((pruned_tiles.sum(1) == prune_count(24, 0.6)).all())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "block:4x4"])
def test_masks_identical_for_the_same_seed(method, pattern):
    def run(seed):
        w, x = layer(32, 64, seed=seed)
        ts = None if pattern == "2:4" else 0.5
        return prune_weight(
            w, PruningConfig(method=method, pattern=pattern, target_sparsity=ts), LayerStats.from_inputs(x)
        )

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    assert not torch.equal(a.mask, c.mask)


def test_ties_are_deterministic():
    """All-equal scores: the lower index is pruned first (stable order), every time."""
    w = torch.ones(4, 8)
    r = prune_magnitude(w, PruningConfig(method="magnitude", target_sparsity=0.5, scope="row"))
    assert torch.equal(r.mask, torch.tensor([[False] * 4 + [True] * 4] * 4))


@pytest.mark.parametrize("scope", ["row", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.97, 1.0])
def test_unstructured_selection_equals_the_stable_sort(scope, sparsity):
    """The selection (kthvalue + ties by index) prunes exactly what a stable ascending sort's first k
    are, with many ties and -inf scores (a prior mask's pruned entries)."""
    from calibra.prune.patterns import Unstructured

    g = torch.Generator().manual_seed(int(sparsity * 100))
    scores = torch.randint(0, 6, (12, 40), generator=g).float()
    scores[torch.rand(12, 40, generator=g) < 0.1] = float("-inf")
    flat = scores.reshape(1, -1) if scope == "layer" else scores
    k = prune_count(flat.shape[1], sparsity)
    want = torch.ones_like(flat, dtype=torch.bool)
    want.scatter_(-1, torch.sort(flat, dim=-1, stable=True).indices[..., :k], False)
    got = Unstructured().mask(scores, sparsity, scope)
    assert torch.equal(got, want.reshape(scores.shape))


def test_wanda_scores_channels():
    """An outlier channel's small weights survive Wanda but not magnitude."""
    w = torch.full((8, 16), 1.0)
    w[:, 3] = 0.05
    sq = torch.ones(16, dtype=torch.float64)
    sq[3] = 1e4
    wanda = prune_wanda(w, sq, PruningConfig(target_sparsity=0.5))
    mag = prune_magnitude(w, PruningConfig(method="magnitude", target_sparsity=0.5, scope="row"))
    assert bool(wanda.mask[:, 3].all()) and not bool(mag.mask[:, 3].any())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_dead_input_channel_finite(method, pattern):
    """FAULTS 19: an all-zero input channel gives a finite result and does not disturb the others."""
    w, x = layer(32, 64, seed=9)
    x[:, 10] = 0.0
    ts = None if pattern == "2:4" else 0.5
    cfg = PruningConfig(method=method, pattern=pattern, target_sparsity=ts)
    r = prune_weight(w, cfg, LayerStats.from_inputs(x))
    assert bool(torch.isfinite(r.weight).all()) and r.reconstruction_error is not None
    assert r.reconstruction_error < 0.5
    if method != "magnitude":
        assert r.dead_channels == 1
        assert not bool(r.mask[:, 10].any())  # the dead channel's weights go first


def test_compressed_24_round_trip():
    w, x = layer(64, 128, seed=11)
    for method in ("wanda", "sparsegpt"):
        r = prune_weight(
            w, PruningConfig(method=method, pattern="2:4", target_sparsity=None), LayerStats.from_inputs(x)
        )
        values, meta = r.to_24()
        assert values.shape == (64, 64) and meta.shape == (64, 8) and meta.dtype == torch.int16
        assert torch.equal(decompress_24(values, meta), r.weight)
    r = prune_weight(w, PruningConfig(method="magnitude", pattern="4:8", target_sparsity=None))
    with pytest.raises(ValueError, match="needs pattern 2:4"):
        r.to_24()


def test_bad_inputs_named():
    w, x = layer(16, 64, seed=0)
    cfg = PruningConfig(pattern="4:8", target_sparsity=None)
    with pytest.raises(ValueError, match=r"\[prune\] 4:8 needs in_features divisible by 8, layer q has 60"):
        prune_magnitude(w[:, :60], PruningConfig(method="magnitude", pattern="4:8", target_sparsity=None), name="q")
    with pytest.raises(ValueError, match=r"\[wanda\] the channel statistics of weight must be \[in\] = \[64\]"):
        prune_wanda(w, torch.ones(63), cfg)
    with pytest.raises(ValueError, match="must be finite"):
        prune_wanda(w, torch.full((64,), float("nan")), cfg)
    bad = w.clone()
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"contains NaN/Inf \(first at row 2, col 3\)"):
        prune_magnitude(bad, PruningConfig(method="magnitude"))
    with pytest.raises(ValueError, match="needs calibration statistics"):
        prune_weight(w, PruningConfig(method="wanda"))
    with pytest.raises(ValueError, match="no Hessian"):
        prune_weight(w, PruningConfig(method="sparsegpt"), LayerStats(channel_sumsq=torch.ones(64)))


def test_low_precision_weights_keep_dtype():
    w, x = layer(32, 64, seed=2)
    for dt in (torch.float16, torch.bfloat16):
        r = prune_weight(
            w.to(dt), PruningConfig(method="wanda", pattern="2:4", target_sparsity=None), LayerStats.from_inputs(x)
        )
        assert r.weight.dtype == dt and torch.equal(r.weight, w.to(dt).masked_fill(~r.mask, 0))


def test_from_calibration_stats_keys():
    class Stats:
        tensors = {"hessian/sum/m": torch.eye(4, dtype=torch.float64) * 3, "norms/sumsq/m": torch.ones(4)}
        counts = {"hessian/m": 7, "norms/m": 7}

    st = LayerStats.from_calibration(Stats(), "m")
    assert st.n_tokens == 7 and torch.equal(st.sumsq(), torch.ones(4))
    assert torch.equal(LayerStats(hessian=torch.eye(4) * 2).sumsq(), torch.full((4,), 2.0))
    x = correlated_inputs(16, 8, 0)
    assert torch.allclose(LayerStats.from_inputs(x).hessian, x.double().T @ x.double())
