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
    mask = ((torch.rand(rows, c, generator=gen) < 0.3).to(torch.uint8) if masked
            else torch.empty(0, dtype=torch.uint8))
    return (w, u, torch.zeros(rows, g), torch.zeros(rows, g), group, fit, mask, torch.tensor(shrink), bits, sym, fmt,
            sdt, 3.7 if fmt == "nvfp4" else 1.0)


def _same(ours, ref, what):
    for i, (a, b) in enumerate(zip(ours, ref)):
        a = a.cpu()
        assert a.dtype == b.dtype and a.shape == b.shape, what
        if not torch.equal(a, b):
            bad = (a != b).nonzero()[0].tolist()
            raise AssertionError(f"{what}: output {i} differs ({int((a != b).sum())} items) first at {bad}: "
                                 f"{a[tuple(bad)]} vs {b[tuple(bad)]}")


CASES = ([("int", b, s, sdt) for b in (2, 3, 4, 8) for s in (True, False)
          for sdt in (torch.float32, torch.float16, torch.bfloat16)]
         + [("mxfp4", 4, True, torch.float32), ("nvfp4", 4, True, torch.float32), ("none", 4, True, torch.float32)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt,bits,sym,sdt", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_native_equals_reference(device, fmt, bits, sym, sdt):
    gs = 32 if fmt == "mxfp4" else 16
    for (rows, c), shrink, masked in itertools.product([(37, 64), (16, 32), (5, 96)], ([1.0], [1.0, 0.95, 0.8]),
                                                       (False, True)):
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
    args = (w, u, scales, zeros, group, torch.zeros(48, dtype=torch.int32), torch.empty(0, dtype=torch.uint8),
            torch.ones(1), 4, False, "int", torch.float32, 1.0)
    ours = run_native("gptq_block_sweep",
                      lambda: torch.ops.calibra.gptq_block_sweep(*(a.to(device) if isinstance(a, torch.Tensor)
                                                                  else a for a in args)), device)
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
        res = gptq_block_sweep(w, torch.eye(64), scales=torch.zeros(19, 2), zeros=torch.zeros(19, 2),
                               group=(torch.arange(64) // 32).to(torch.int32), fit=fit, bits=3, symmetric=sym)
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
        res = gptq_block_sweep(w, torch.eye(64), scales=torch.zeros(9, 64 // gs), zeros=torch.zeros(9, 64 // gs),
                               group=(torch.arange(64) // gs).to(torch.int32), fit=fit, format=fmt,
                               global_scale=float(gscale))
        assert torch.equal(res.codes, codes), fmt
        assert torch.equal(res.q, calibra.ops._ref.dequantize_fp4(codes, scales, gscale, fmt, torch.float32)), fmt


def test_mask_prunes_to_zero_and_propagates():
    w, u = _block(8, 32, seed=5)
    mask = torch.zeros(8, 32, dtype=torch.uint8)
    mask[:, 0] = 1
    res = gptq_block_sweep(w, u, scales=torch.ones(8, 1), zeros=torch.zeros(8, 1),
                           group=torch.zeros(32, dtype=torch.int32), fit=torch.zeros(32, dtype=torch.int32),
                           mask=mask, format="none")
    assert torch.equal(res.q[:, 0], torch.zeros(8))
    assert torch.allclose(res.err[:, 0], w[:, 0] / u[0, 0])
    # column 1 got the OBS update of the pruned column 0: q = w1 - err0 * u01
    assert torch.equal(res.q[:, 1], w[:, 1] - res.err[:, 0] * u[0, 1])


def test_example_runs_natively():
    run_native("gptq_block_sweep", lambda: torch.ops.calibra.gptq_block_sweep(*_example("cpu")), "cpu")


def test_bad_input():
    w, u = _block(4, 16)
    base = dict(scales=torch.zeros(4, 1), zeros=torch.zeros(4, 1), group=torch.zeros(16, dtype=torch.int32),
                fit=torch.zeros(16, dtype=torch.int32))
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
        _ref.gptq_block_sweep(w, u, base["scales"], base["zeros"], bad_group["group"], base["fit"],
                              torch.empty(0, dtype=torch.uint8), torch.ones(1), 4, True, "int", torch.float32, 1.0)
    bad_fit = dict(base, fit=torch.tensor([0] * 15 + [2], dtype=torch.int32))
    with pytest.raises(ValueError, match="fits stay in the block"):
        gptq_block_sweep(w, u, **bad_fit)
