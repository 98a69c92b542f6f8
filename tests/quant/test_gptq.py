"""GPTQ solver: never worse than RTN on its own objective, native sweep == reference sweep, act-order
and g_idx, static groups, the damping ladder, dead channels, inputs untouched, errors naming the module."""

import itertools

import pytest
import torch

import calibra
from calibra.quant import GPTQConfig, RTNConfig, gptq_quantize, rtn_quantize
from calibra.quant.gptq import reference_sweep
from tests.quant._layers import layer, proxy_error

GRID = [
    dict(bits=b, group_size=g, sym=s, desc_act=a, static_groups=st)
    for b, g, s, (a, st) in itertools.product(
        (2, 3, 4, 8), (-1, 32, 128), (True, False), ((False, False), (True, False), (True, True))
    )
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_error_never_above_rtn(seed):
    w, h, tokens, _ = layer(seed=seed)
    for opts in GRID:
        if seed and opts["bits"] in (3, 8):  # keep the test fast: every option on seed 0, a subset on others
            continue
        cfg = GPTQConfig(block_size=64, **opts)
        ours = gptq_quantize(w, h, tokens, cfg, name="m")
        rtn = rtn_quantize(w, RTNConfig(bits=opts["bits"], group_size=opts["group_size"], sym=opts["sym"]))
        e_g, e_r = proxy_error(w, ours.weight, h), proxy_error(w, rtn.weight, h)
        assert e_g <= e_r, f"{opts}: GPTQ {e_g} > RTN {e_r}"
        if opts["bits"] <= 4:
            assert e_g < 0.8 * e_r, f"{opts}: GPTQ {e_g} not clearly below RTN {e_r}"


@pytest.mark.parametrize(
    "opts",
    [
        dict(group_size=32),
        dict(group_size=-1, sym=False),
        dict(group_size=32, desc_act=True),
        dict(group_size=64, desc_act=True, static_groups=True, bits=3),
        dict(group_size=16, mse_clip=True, mse_grid=20),
        dict(format="nvfp4", group_size=16, mse_clip=True, mse_grid=20),
        dict(format="mxfp4", group_size=32),
    ],
    ids=str,
)
def test_native_sweep_equals_reference_sweep(opts):
    # Same driver, the block sweep swapped: per element the same float operations in the same order, so the
    # codes are equal exactly (no budget of differing codes was needed).
    w, h, tokens, _ = layer(out=40, n=128, seed=3)
    cfg = GPTQConfig(block_size=48, **opts)
    with calibra.ops.trace() as t:
        nat = gptq_quantize(w, h, tokens, cfg)
    assert t.impls("gptq_block_sweep") == {"cpu"}
    ref = gptq_quantize(w, h, tokens, cfg, sweep=reference_sweep)
    assert torch.equal(nat.codes, ref.codes)
    assert torch.equal(nat.weight, ref.weight)
    assert torch.equal(
        nat.scales.view(torch.uint8) if nat.scales.dtype == torch.float8_e4m3fn else nat.scales,
        ref.scales.view(torch.uint8) if ref.scales.dtype == torch.float8_e4m3fn else ref.scales,
    )
    assert nat.log.loss == ref.log.loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_layout_and_dequantize(dtype):
    w, h, tokens, _ = layer(out=16, n=128, seed=4)
    w = w.to(dtype)
    for cfg in (
        GPTQConfig(group_size=32),
        GPTQConfig(group_size=32, desc_act=True),
        GPTQConfig(group_size=-1),
        GPTQConfig(group_size=32, desc_act=True, static_groups=True, sym=False),
    ):
        r = gptq_quantize(w, h, tokens, cfg)
        assert r.weight.dtype == dtype and r.scales.dtype == dtype and r.zeros.dtype == torch.uint8
        g = 1 if cfg.group_size == -1 else 128 // cfg.group_size
        assert r.codes.shape == (16, 128) and r.scales.shape == (16, g) and r.zeros.shape == (16, g)
        assert torch.equal(r.dequantize(), r.weight)  # codes/scales/zeros/g_idx rebuild the weight exactly
        if not cfg.uses_g_idx:
            assert r.g_idx is None  # contiguous groups: the layout of calibra.ops.quantize
            qt = calibra.ops.QuantizedTensor(
                r.codes, r.scales, r.zeros, None, 4, cfg.group_size, cfg.sym, "int", tuple(w.shape), dtype
            )
            assert torch.equal(calibra.ops.dequantize(qt), r.weight)


def test_act_order_g_idx_consistency():
    w, h, tokens, _ = layer(out=8, n=128, seed=5)
    r = gptq_quantize(w, h, tokens, GPTQConfig(group_size=32, desc_act=True))
    perm = torch.sort(h.diagonal(), descending=True, stable=True).indices
    # the j-th column in act-order belongs to group j // 32
    assert torch.equal(r.g_idx[perm].long(), torch.arange(128) // 32)
    assert torch.equal(torch.bincount(r.g_idx.long()), torch.full((4,), 32))
    assert r.g_idx.dtype == torch.int32
    # ties in diag(H) keep index order
    h2 = torch.eye(64) * 2.0
    r2 = gptq_quantize(w[:, :64], h2, 10, GPTQConfig(group_size=16, desc_act=True))
    assert torch.equal(r2.g_idx.long(), torch.arange(64) // 16)


def test_static_groups_are_fitted_on_unpermuted_w():
    w, h, tokens, _ = layer(out=8, n=64, seed=6)
    r = gptq_quantize(w, h, tokens, GPTQConfig(group_size=16, desc_act=True, static_groups=True, sym=False))
    ref_codes, scales, zeros = calibra.ops._ref.quantize_int(w, 4, 16, False)
    assert torch.equal(r.scales, scales) and torch.equal(r.zeros, zeros)
    assert r.g_idx is None


def test_inputs_untouched_and_log():
    w, h, tokens, _ = layer(out=8, n=64, seed=7)
    w0, h0 = w.clone(), h.clone()
    r = gptq_quantize(
        w, h, tokens, GPTQConfig(group_size=16, desc_act=True), name="model.layers.0.mlp.up_proj", layer=0
    )
    assert torch.equal(w, w0) and torch.equal(h, h0)
    row = r.log.to_dict()
    assert row["module"] == "model.layers.0.mlp.up_proj" and row["layer"] == 0 and row["samples"] == tokens
    assert row["ladder_steps"] == 0 and row["damp_percent"] == 0.01 and not row["float64"]
    assert row["damp"] == pytest.approx(0.01 * float((2 * h / tokens).diagonal().mean()), rel=1e-5)
    assert row["loss"] > 0 and row["seconds"] > 0


def test_damping_ladder_on_indefinite_hessian():
    w, h, tokens, x = layer(out=8, n=64, seed=8)
    bad = h.clone()
    bad[5, 7] = bad[7, 5] = 3 * float(h.diagonal().max())  # indefinite: a 2x2 minor with negative determinant
    b0 = bad.clone()
    r = gptq_quantize(w, bad, tokens, GPTQConfig(group_size=16), name="blk.3.attn.q")
    assert torch.equal(bad, b0)  # the caller's Hessian is untouched
    assert r.log.ladder_steps >= 1 and r.log.damp_percent > 0.01
    assert bool(torch.isfinite(r.weight).all())
    # rank-deficient (singular) Hessian: few tokens
    sing = x[:8].T @ x[:8]
    r2 = gptq_quantize(w, sing, 8, GPTQConfig(group_size=16))
    assert bool(torch.isfinite(r2.weight).all())


def test_damping_ladder_exhausted_names_module():
    w, h, tokens, _ = layer(out=4, n=32, seed=9)
    neg = -torch.eye(32) * 1000.0 + torch.ones(32, 32) * 0.0
    with pytest.raises(
        ValueError,
        match=r"\[gptq\] Hessian of model.layers.2.self_attn.k_proj is not positive "
        r"definite even with damp 10.0",
    ):
        gptq_quantize(w, neg, 10, GPTQConfig(group_size=16), name="model.layers.2.self_attn.k_proj")


def test_dead_channel():
    w, h, tokens, x = layer(out=16, n=64, seed=10)
    x[:, 9] = 0
    hd = x.T @ x
    r = gptq_quantize(w, hd, tokens, GPTQConfig(group_size=-1, desc_act=False))
    assert bool(torch.isfinite(r.weight).all()) and r.log.dead_channels == 1
    assert torch.equal(r.weight[:, 9], torch.zeros(16))
    # the other columns are as if the channel did not exist (same damping: dead channels excluded from it);
    # scales are per row, so drop channel 9 from W only where it cannot move the row's range: zero it
    keep = [i for i in range(64) if i != 9]
    w0 = w.clone()
    w0[:, 9] = 0
    alone = gptq_quantize(
        w0[:, keep].contiguous(), hd[keep][:, keep].contiguous(), tokens, GPTQConfig(group_size=-1, block_size=128)
    )
    assert torch.allclose(r.weight[:, keep], alone.weight, atol=1e-6)


def test_errors_name_the_module():
    w, h, tokens, _ = layer(out=4, n=96, seed=11)
    with pytest.raises(ValueError, match=r"nvfp4 needs in_features divisible by its scale block 16, layer layers.1"):
        fp4 = GPTQConfig(format="nvfp4", bits=4, group_size=16)
        gptq_quantize(w[:, :88], h[:88, :88], tokens, fp4, name="layers.1.mlp")
    with pytest.raises(ValueError, match=r"Hessian of layers.1.mlp must be \[in, in\]"):
        gptq_quantize(w, h[:64, :64], tokens, GPTQConfig(group_size=32), name="layers.1.mlp")
    with pytest.raises(ValueError, match=r"layers.1.mlp needs a Hessian from at least one token"):
        gptq_quantize(w, h, 0, GPTQConfig(group_size=32), name="layers.1.mlp")
    hn = h.clone()
    hn[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"Hessian of layers.1.mlp contains NaN"):
        gptq_quantize(w, hn, tokens, GPTQConfig(group_size=32), name="layers.1.mlp")
    with pytest.raises(TypeError, match="never a low-precision"):
        gptq_quantize(w, h.half(), tokens, GPTQConfig(group_size=32), name="layers.1.mlp")


@pytest.mark.parametrize("desc_act", [False, True])
def test_shared_factorization_is_the_same_solve(monkeypatch, desc_act):
    """q/k/v read one Hessian: with SharedFactorizations the first solve factors it and the other two reuse
    the factor (one factorization instead of three), and every output is bit-identical to solving alone,
    dead input channels and act-order included."""
    import calibra.quant.gptq as gptq_mod

    g = torch.Generator().manual_seed(5)
    w0, h, tokens, _ = layer(seed=3)
    h = h.clone()
    h[7, :] = 0.0  # a dead input channel: every reader must zero its own column 7
    h[:, 7] = 0.0
    weights = [w0, torch.randn(w0.shape, generator=g) * w0.std(), torch.randn(16, w0.shape[1], generator=g)]
    cfg = GPTQConfig(group_size=32, desc_act=desc_act)
    alone = [gptq_quantize(w, h, tokens, cfg, name=f"m{i}") for i, w in enumerate(weights)]

    calls = []
    real = gptq_mod.factor_inverse_hessian
    monkeypatch.setattr(gptq_mod, "factor_inverse_hessian", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = gptq_mod.SharedFactorizations()
    together = [gptq_quantize(w, h, tokens, cfg, name=f"m{i}", shared=shared) for i, w in enumerate(weights)]
    assert len(calls) == 1
    for a, b in zip(alone, together):
        for f in ("codes", "scales", "zeros", "weight", "g_idx"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None and y is None) or torch.equal(x, y), f
        assert a.log.loss == b.log.loss and a.log.damp == b.log.damp and a.log.dead_channels == b.log.dead_channels == 1
        assert bool((b.codes[:, 7] == b.zeros[:, 0 if not desc_act else b.g_idx[7]]).all())  # dead column -> 0
    # another Hessian (same shape) is factored anew, never served the first one's factor
    other = h.clone() * 2
    gptq_quantize(w0, other, tokens, cfg, name="x", shared=shared)
    assert len(calls) == 2


@pytest.mark.parametrize("n", [77, 300, 2050])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upper_inverse_is_the_triangular_inverse(n, dtype):
    """upper_inverse solves column blocks against their leading systems only: the same matrix as one solve
    against the whole identity (bit for bit up to one block; to rounding beyond), upper triangular."""
    from calibra.quant.gptq import upper_inverse

    g = torch.Generator().manual_seed(n)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    v = torch.linalg.cholesky(m @ m.T / n + 0.5 * torch.eye(n, dtype=torch.float64)).T.to(dtype)  # upper
    one_call = torch.linalg.solve_triangular(v, torch.eye(n, dtype=dtype), upper=True)
    for block in (64, 1024):
        u = upper_inverse(v, block=block)
        assert u.dtype == dtype and u.shape == (n, n)
        assert torch.equal(u, u.triu())
        if n <= block:
            assert torch.equal(u, one_call)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        assert torch.allclose(u, one_call, rtol=tol, atol=tol * float(one_call.abs().max()))
        assert torch.allclose(v.double() @ u.double(), torch.eye(n, dtype=torch.float64), atol=50 * tol)
