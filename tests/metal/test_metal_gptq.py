"""metal/gptq.metal (cal_gptq_sweep: calibra::gptq_block_sweep and calibra::sparsegpt_block_sweep) on the CPU
harness, against calibra.ops._ref.gptq.

The reference is deterministic and the kernel performs its operations in the same order per element (IEEE
division, rint, multiply then subtract, the clipping search's squared errors summed column by column), so
every output -- codes, the N:M mask, and the float values, scaled errors and fitted tables too -- must be
identical, as on the CPU and CUDA backends. Odd row counts (threadgroups of 64 with absent rows), every
format and grid, clipping searches, masks, static tables in permuted (act-order) group order, ties."""

from __future__ import annotations

import itertools

import pytest
import torch

from calibra.ops import OPS, _ref
from calibra.ops._registry import _mps_call, trace
from tests.metal.checks import assert_same
from tests.ops.test_gptq import CASES, NM_CASES, _args, _block, _nm_args


def _same_outputs(got, want, what):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        try:
            assert_same(g, w)
        except AssertionError as e:
            raise AssertionError(f"{what}: output {i}: {e}") from None


def _run(metal, name, args):
    """The op through the MPS backend's calling convention (check, alloc, host data check, launch), with the
    harness as the GPU: what calibra's registry does for an mps tensor."""
    op = OPS[name]
    op.check(*args)
    with trace() as t:
        outs = _mps_call(op, getattr(metal, name), args, op.alloc(*args))
    assert t.impls(name) == {"mps"}, t
    return outs


@pytest.mark.parametrize("fmt,bits,sym,sdt", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_sweep_equals_reference(metal, fmt, bits, sym, sdt):
    gs = 32 if fmt == "mxfp4" else 16
    for (rows, c), shrink, masked in itertools.product(
        [(37, 64), (65, 32), (3, 96)], ([1.0], [1.0, 0.9, 0.75]), (False, True)
    ):
        args = _args(rows, c, fmt, bits, sym, sdt, shrink, masked, gs)
        _same_outputs(
            _run(metal, "gptq_block_sweep", args),
            _ref.gptq_block_sweep(*args),
            f"{fmt} bits={bits} sym={sym} {sdt} {rows}x{c} shrink={shrink} masked={masked}",
        )


def test_sweep_static_act_order_table(metal):
    # static groups in act order: a precomputed table, group indices not monotone, no fits
    w, u = _block(23, 40, seed=4)
    group = torch.tensor([(i * 7) % 5 for i in range(40)], dtype=torch.int32)
    scales = torch.rand(23, 5) * 0.2 + 0.05
    zeros = torch.randint(0, 16, (23, 5)).float()
    args = (
        w,
        u,
        scales,
        zeros,
        group,
        torch.zeros(40, dtype=torch.int32),
        torch.empty(0, dtype=torch.uint8),
        torch.ones(1),
        4,
        False,
        "int",
        torch.float32,
        1.0,
    )
    got = _run(metal, "gptq_block_sweep", args)
    _same_outputs(got, _ref.gptq_block_sweep(*args), "static table")
    assert torch.equal(got[3], scales) and torch.equal(got[4], zeros)  # an unfitted table passes through


def test_sweep_per_row_fit_over_the_block(metal):
    # one entry fitted once at column 0 from the whole block (per-channel params), asymmetric 3-bit
    w, u = _block(9, 24, seed=5)
    fit = torch.zeros(24, dtype=torch.int32)
    fit[0] = 24
    args = (
        w,
        u,
        torch.zeros(9, 1),
        torch.zeros(9, 1),
        torch.zeros(24, dtype=torch.int32),
        fit,
        torch.empty(0, dtype=torch.uint8),
        torch.tensor([1.0, 0.8]),
        3,
        False,
        "int",
        torch.bfloat16,
        1.0,
    )
    _same_outputs(_run(metal, "gptq_block_sweep", args), _ref.gptq_block_sweep(*args), "per-row fit")


@pytest.mark.parametrize("n,m,fmt,gs", NM_CASES + [(5, 32, "int", 32)], ids=lambda v: str(v))
def test_nm_sweep_equals_reference(metal, n, m, fmt, gs):
    for rows, c, sym, ties in (
        (37, 64, True, False),
        (5, 32, False, False),
        (16, 64, True, True),
        (67, 32, False, True),
    ):
        if c % gs or c % m:
            continue
        args = _nm_args(rows, c, n, m, fmt, gs, sym=sym, ties=ties)
        got = _run(metal, "sparsegpt_block_sweep", args)
        _same_outputs(got, _ref.sparsegpt_block_sweep(*args), f"{n}:{m} {fmt} g{gs} {rows}x{c} sym={sym} ties={ties}")
        assert bool(((~got[5]).reshape(rows, c // m, m).sum(-1) == n).all())  # exactly n kept per group


def test_sweep_empty_rows_pass_the_table_through(metal):
    args = _args(4, 16, "int", 4, True, torch.float32, [1.0], False, 16)
    args = (args[0][:0], args[1], args[2][:0], args[3][:0], *args[4:])
    got = _run(metal, "gptq_block_sweep", args)
    _same_outputs(got, _ref.gptq_block_sweep(*args), "no rows")


def test_sweep_bad_tables_raise_before_the_launch(metal, executor):
    # a kernel cannot raise: group / fit entries out of range are the host's check, with the reference's message
    args = list(_args(4, 16, "int", 4, True, torch.float32, [1.0], False, 16))
    args[4] = torch.full((16,), 3, dtype=torch.int32)  # the table has one entry
    launched = len(executor.kernels)
    with pytest.raises(ValueError, match=r"\[gptq_block_sweep\] group entries must be in \[0, 1\)"):
        _run(metal, "gptq_block_sweep", tuple(args))
    nm = list(_nm_args(4, 16, 2, 4, "int", 16))
    nm[5] = torch.full((16,), 9, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\[sparsegpt_block_sweep\] fit\[i\] must be >= 0"):
        _run(metal, "sparsegpt_block_sweep", tuple(nm))
    assert len(executor.kernels) == launched
