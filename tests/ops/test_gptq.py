"""calibra::gptq_block_sweep: the native sweep equals the reference bit for bit (codes, values, scaled
errors, fitted tables) across formats, grids, clipping searches, masks and odd shapes; plus
hand-checkable properties and bad input."""

import itertools

import pytest
import torch

import calibra
from calibra.ops import _ref
from calibra.ops.gptq import _example, gptq_block_sweep
from tests.ops.harness import DEVICES, run_native


def _block(rows, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * c, c, generator=g) @ (torch.randn(c, c, generator=g) * 0.3 + torch.eye(c))
    h = x.T @ x + 0.01 * torch.eye(c)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = torch.randn(rows, c, generator=g) * torch.logspace(-2, 1, rows, dtype=torch.float32)[:, None]
    return w, u.contiguous()


def _args(rows, c, fmt, bits, sym, sdt, shrink, masked, gs, seed=0):
    w, u = _block(rows, c, seed)
    g = c // gs
    group = (torch.arange(c) // gs).to(torch.int32)
    fit = torch.zeros(c, dtype=torch.int32)
    fit[::gs] = gs
    gen = torch.Generator().manual_seed(seed + 1)
    mask = (torch.rand(rows, c, generator=gen) < 0.3).to(torch.uint8) if masked else torch.empty(0, dtype=torch.uint8)
    return (
        w,
        u,
        torch.zeros(rows, g),
        torch.zeros(rows, g),
        group,
        fit,
        mask,
        torch.tensor(shrink),
        bits,
        sym,
        fmt,
        sdt,
        3.7 if fmt == "nvfp4" else 1.0,
    )


def _same(ours, ref, what):
    for i, (a, b) in enumerate(zip(ours, ref)):
        a = a.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, what
        if not torch.equal(a, b):
            bad = (a != b).nonzero()[0].tolist()
            raise AssertionError(
                f"{what}: output {i} differs ({int((a != b).sum())} items) first at {bad}: "
                f"{a[tuple(bad)]} vs {b[tuple(bad)]}"
            )


CASES = [
    ("int", b, s, sdt)
    for b in (2, 3, 4, 8)
    for s in (True, False)
    for sdt in (torch.float32, torch.float16, torch.bfloat16)
] + [("mxfp4", 4, True, torch.float32), ("nvfp4", 4, True, torch.float32), ("none", 4, True, torch.float32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt,bits,sym,sdt", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_native_equals_reference(device, fmt, bits, sym, sdt):
    gs = 32 if fmt == "mxfp4" else 16
    for (rows, c), shrink, masked in itertools.product(
        [(37, 64), (16, 32), (5, 96)], ([1.0], [1.0, 0.95, 0.8]), (False, True)
    ):
        args = _args(rows, c, fmt, bits, sym, sdt, shrink, masked, gs)
        dev = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        ours = run_native("gptq_block_sweep", lambda: torch.ops.calibra.gptq_block_sweep(*dev), device)
        _same(ours, _ref.gptq_block_sweep(*args), f"{fmt} bits={bits} sym={sym} {sdt} {rows}x{c} {shrink} {masked}")


@pytest.mark.parametrize("device", DEVICES)
def test_static_table_and_per_row(device):
    # a precomputed table (static groups in permuted order: non-monotone group indices), no fits
    w, u = _block(21, 48, seed=4)
    group = torch.tensor([(i * 7) % 3 for i in range(48)], dtype=torch.int32)
    scales = torch.rand(21, 3) * 0.2 + 0.05
    zeros = torch.randint(0, 16, (21, 3)).float()
    args = (
        w,
        u,
        scales,
        zeros,
        group,
        torch.zeros(48, dtype=torch.int32),
        torch.empty(0, dtype=torch.uint8),
        torch.ones(1),
        4,
        False,
        "int",
        torch.float32,
        1.0,
    )
    ours = run_native(
        "gptq_block_sweep",
        lambda: torch.ops.calibra.gptq_block_sweep(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)),
        device,
    )
    ref = _ref.gptq_block_sweep(*args)
    _same(ours, ref, "static table")
    assert torch.equal(ours[3].cpu(), scales) and torch.equal(ours[4].cpu(), zeros)  # unfitted table passes through


def test_identity_u_is_rtn():
    # with U = I no error is propagated: the sweep is plain RTN, equal to calibra.ops.quantize's reference
    g = torch.Generator().manual_seed(2)
    w = torch.randn(19, 64, generator=g)
    fit = torch.zeros(64, dtype=torch.int32)
    fit[::32] = 32
    for sym in (True, False):
        res = gptq_block_sweep(
            w,
            torch.eye(64),
            scales=torch.zeros(19, 2),
            zeros=torch.zeros(19, 2),
            group=(torch.arange(64) // 32).to(torch.int32),
            fit=fit,
            bits=3,
            symmetric=sym,
        )
        codes, scales, zeros = calibra.ops._ref.quantize_int(w, 3, 32, sym)
        assert torch.equal(res.codes, codes)
        assert torch.equal(res.scales, scales) and torch.equal(res.zeros, zeros.float())
        assert torch.equal(res.q, calibra.ops._ref.dequantize_int(codes, scales, zeros, 32, torch.float32))
        assert torch.equal(res.err, w - res.q)


def test_identity_u_fp4_equals_quantize_fp4():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(9, 64, generator=g)
    for fmt, gs in (("mxfp4", 32), ("nvfp4", 16)):
        codes, scales, gscale = calibra.ops._ref.quantize_fp4(w, fmt)
        fit = torch.zeros(64, dtype=torch.int32)
        fit[::gs] = gs
        res = gptq_block_sweep(
            w,
            torch.eye(64),
            scales=torch.zeros(9, 64 // gs),
            zeros=torch.zeros(9, 64 // gs),
            group=(torch.arange(64) // gs).to(torch.int32),
            fit=fit,
            format=fmt,
            global_scale=float(gscale),
        )
        assert torch.equal(res.codes, codes), fmt
        assert torch.equal(res.q, calibra.ops._ref.dequantize_fp4(codes, scales, gscale, fmt, torch.float32)), fmt


def test_mask_prunes_to_zero_and_propagates():
    w, u = _block(8, 32, seed=5)
    mask = torch.zeros(8, 32, dtype=torch.uint8)
    mask[:, 0] = 1
    res = gptq_block_sweep(
        w,
        u,
        scales=torch.ones(8, 1),
        zeros=torch.zeros(8, 1),
        group=torch.zeros(32, dtype=torch.int32),
        fit=torch.zeros(32, dtype=torch.int32),
        mask=mask,
        format="none",
    )
    assert torch.equal(res.q[:, 0], torch.zeros(8))
    assert torch.allclose(res.err[:, 0], w[:, 0] / u[0, 0])
    # column 1 got the OBS update of the pruned column 0: q = w1 - err0 * u01
    assert torch.equal(res.q[:, 1], w[:, 1] - res.err[:, 0] * u[0, 1])


def test_example_runs_natively():
    run_native("gptq_block_sweep", lambda: torch.ops.calibra.gptq_block_sweep(*_example("cpu")), "cpu")


def _one_group_args() -> dict:
    """Parameter tables of a 4 x 16 block with one group and no fits (for the argument checks)."""
    return dict(
        scales=torch.zeros(4, 1),
        zeros=torch.zeros(4, 1),
        group=torch.zeros(16, dtype=torch.int32),
        fit=torch.zeros(16, dtype=torch.int32),
    )


def test_bad_input():
    w, u = _block(4, 16)
    base = _one_group_args()
    with pytest.raises(ValueError, match=r"\[gptq_block_sweep\] u must be"):
        gptq_block_sweep(w, u[:8, :8], **base)
    with pytest.raises(ValueError, match=r"bits must be in \[2, 8\]"):
        gptq_block_sweep(w, u, bits=9, **base)
    with pytest.raises(ValueError, match="format must be one of"):
        gptq_block_sweep(w, u, format="fp8", **base)
    with pytest.raises(TypeError, match="w must be one of float32"):
        gptq_block_sweep(w.half(), u, **base)
    bad_group = dict(base, group=torch.full((16,), 3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"group entries must be in \[0, 1\)"):
        gptq_block_sweep(w, u, **bad_group)
    with pytest.raises(ValueError, match=r"group entries must be in \[0, 1\)"):
        _ref.gptq_block_sweep(
            w,
            u,
            base["scales"],
            base["zeros"],
            bad_group["group"],
            base["fit"],
            torch.empty(0, dtype=torch.uint8),
            torch.ones(1),
            4,
            True,
            "int",
            torch.float32,
            1.0,
        )
    bad_fit = dict(base, fit=torch.tensor([0] * 15 + [2], dtype=torch.int32))
    with pytest.raises(ValueError, match="fits stay in the block"):
        gptq_block_sweep(w, u, **bad_fit)


# ---- calibra::sparsegpt_block_sweep: N:M selection inside the sweep ----------------------------------

from calibra.ops.gptq import _nm_example, sparsegpt_block_sweep  # noqa: E402


def _nm_args(rows, c, n, m, fmt, gs, sym=True, sdt=torch.float16, seed=0, ties=False):
    w, u = _block(rows, c, seed)
    if ties:
        # equal saliencies inside groups: repeated magnitudes (and signs) with U = I keeps them equal
        # through the sweep; plus exact zeros (a whole group of zeros is all ties)
        w = torch.randint(-2, 3, (rows, c), generator=torch.Generator().manual_seed(seed)).float()
        u = torch.eye(c)
    g = c // gs
    group = (torch.arange(c) // gs).to(torch.int32)
    fit = torch.zeros(c, dtype=torch.int32)
    if fmt != "none":
        fit[::gs] = gs
    return (w, u, torch.zeros(rows, g), torch.zeros(rows, g), group, fit, torch.ones(1), n, m, 4, sym, fmt, sdt, 1.0)


NM_CASES = [
    (2, 4, "none", 32),
    (2, 4, "int", 32),
    (4, 8, "none", 64),
    (4, 8, "int", 16),
    (1, 4, "int", 8),
    (3, 16, "none", 16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m,fmt,gs", NM_CASES, ids=lambda v: str(v))
def test_nm_native_equals_reference(device, n, m, fmt, gs):
    """Bit for bit: values, codes, scaled errors, tables and the chosen mask; odd row counts (tiles of 16
    with absent rows), asymmetric grids, exact ties."""
    for rows, c, sym, ties in (
        (37, 64, True, False),
        (5, 32, False, False),
        (16, 64, True, True),
        (19, 32, False, True),
    ):
        if c % gs or c % m:
            continue
        args = _nm_args(rows, c, n, m, fmt, gs, sym=sym, ties=ties)
        dev = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        ours = run_native("sparsegpt_block_sweep", lambda: torch.ops.calibra.sparsegpt_block_sweep(*dev), device)
        ref = _ref.sparsegpt_block_sweep(*args)
        _same(ours, ref, f"{n}:{m} {fmt} g{gs} {rows}x{c} sym={sym} ties={ties}")
        prune = ours[5].cpu()
        assert bool(((~prune).reshape(rows, c // m, m).sum(-1) == n).all())  # exactly n kept per group
        assert bool((ours[0].cpu()[prune] == 0).all())


def test_nm_tie_rule_lower_index_kept():
    # U = I: nothing propagates, so the mask is the static rule on w^2: all-equal groups keep their first n
    w = torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 3.0, 3.0, 2.0, -2.0, 2.0, 5.0]])
    r = sparsegpt_block_sweep(
        w,
        torch.eye(8),
        scales=torch.ones(2, 1),
        zeros=torch.zeros(2, 1),
        group=torch.zeros(8, dtype=torch.int32),
        fit=torch.zeros(8, dtype=torch.int32),
        n=2,
        m=4,
    )
    keep = ~r.prune
    assert keep.tolist() == [
        [True, True, False, False, True, True, False, False],
        [True, False, True, False, True, False, False, True],
    ]
    assert torch.equal(keep, calibra.ops.nm_mask(w.square(), 2, 4))  # the same rule as nm_mask


def test_nm_selection_uses_updated_weights():
    # the second group is chosen from the error-updated weights, not the block's input
    w, u = _block(8, 16, seed=9)
    r = sparsegpt_block_sweep(
        w,
        u,
        scales=torch.ones(8, 1),
        zeros=torch.zeros(8, 1),
        group=torch.zeros(16, dtype=torch.int32),
        fit=torch.zeros(16, dtype=torch.int32),
        n=2,
        m=4,
    )
    # replay: column 4's current values are w - sum_{k<4} err_k u[k, 4..8)
    cur = w[:, 4:8].clone()
    for k in range(4):
        cur -= r.err[:, k : k + 1] * u[k, 4:8][None, :]
    sal = (cur * cur) / (u.diagonal()[4:8] * u.diagonal()[4:8])[None, :]
    assert torch.equal(~r.prune[:, 4:8], calibra.ops.nm_mask(sal, 2, 4))


def test_nm_joint_quant_pruned_codes_are_zero_points():
    args = _nm_args(21, 64, 2, 4, "int", 16, sym=False)
    r = sparsegpt_block_sweep(
        *args[:2],
        scales=args[2],
        zeros=args[3],
        group=args[4],
        fit=args[5],
        n=2,
        m=4,
        symmetric=False,
        format="int",
        scale_dtype=torch.float16,
    )
    z = r.zeros[:, (torch.arange(64) // 16)]
    assert torch.equal(r.codes[r.prune].float(), z[r.prune])
    assert bool((r.q[r.prune] == 0).all())
    kept = ~r.prune
    s = r.scales[:, (torch.arange(64) // 16)]
    assert torch.equal(r.q[kept], ((r.codes.float() - z) * s)[kept])


def test_nm_example_runs_natively():
    run_native("sparsegpt_block_sweep", lambda: torch.ops.calibra.sparsegpt_block_sweep(*_nm_example("cpu")), "cpu")


def test_nm_bad_input():
    w, u = _block(4, 16)
    base = _one_group_args()
    with pytest.raises(ValueError, match=r"\[sparsegpt_block_sweep\] need 0 < n < m <= 32, got n=4 m=4"):
        sparsegpt_block_sweep(w, u, n=4, m=4, **base)
    with pytest.raises(ValueError, match=r"need 0 < n < m <= 32, got n=0 m=4"):
        sparsegpt_block_sweep(w, u, n=0, m=4, **base)
    with pytest.raises(ValueError, match=r"need 0 < n < m <= 32, got n=2 m=64"):
        sparsegpt_block_sweep(w, u, n=2, m=64, **base)
    with pytest.raises(ValueError, match=r"column count \(16\) must be a multiple of m = 6"):
        sparsegpt_block_sweep(w, u, n=2, m=6, **base)
    with pytest.raises(ValueError, match=r"\[sparsegpt_block_sweep\] u must be"):
        sparsegpt_block_sweep(w, u[:8, :8], n=2, m=4, **base)
    with pytest.raises(ValueError, match=r"\[sparsegpt_block_sweep\] format must be one of"):
        sparsegpt_block_sweep(w, u, n=2, m=4, format="fp8", **base)
    with pytest.raises(ValueError, match=r"group entries must be in \[0, 1\)"):
        sparsegpt_block_sweep(w, u, n=2, m=4, **dict(base, group=torch.full((16,), 3, dtype=torch.int32)))
    # the C++ entry rejects what the registry would (direct call, bypassing the Python checks)
    from calibra import _native

    mod = _native.load("cpu")
    outs = [
        torch.empty(4, 16),
        torch.empty(4, 16, dtype=torch.uint8),
        torch.empty(4, 16),
        torch.empty(4, 1),
        torch.empty(4, 1),
        torch.empty(4, 16, dtype=torch.bool),
    ]
    ta = _native.tensor_arg
    with pytest.raises(ValueError, match=r"\[sparsegpt_block_sweep\] the block's column count"):
        mod.sparsegpt_block_sweep(
            ta(w),
            ta(u),
            ta(base["scales"]),
            ta(base["zeros"]),
            ta(base["group"]),
            ta(base["fit"]),
            ta(torch.ones(1)),
            1,
            3,
            4,
            True,
            "none",
            0,
            1.0,
            *(ta(o) for o in outs),
        )


def test_nm_opcheck():
    # schema, fake (alloc) and the native impl agree (fake tensors, aliasing, outputs)
    torch.library.opcheck(torch.ops.calibra.sparsegpt_block_sweep.default, _nm_example("cpu"))
