"""metal/w4a16.metal (calibra::w4a16_repack and calibra::w4a16_gemm: GEMV for one row, the tiled GEMM for
more) on the CPU harness, against calibra.ops._ref.gemm.

The repack is integer work: identical words. The GEMM accumulates in fp32 in its own order, so it follows
the op tests' float rule (tests/ops/harness.assert_close_2x): |ours - exact| <= 2 |reference - exact| +
1e-3 max|exact|, exact = fp64 products of the same dequantized weights; the dequantized weights themselves
are checked bit for bit through a one-hot x."""

from __future__ import annotations

import pytest
import torch

from calibra.ops import _ref
from calibra.ops._ref import gemm as G
from tests.metal.checks import assert_same, gen
from tests.metal.test_metal_gptq import _run
from tests.ops.harness import assert_close_2x
from tests.ops.test_gemm import quantized_operands

ACT = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("n,k", [(64, 16), (192, 48), (128, 272)])
def test_repack_equals_reference(metal, n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen(n + k))
    qweight = _ref.pack(codes, 4, 1, torch.int32)
    tiled = _run(metal, "w4a16_repack", (qweight,))
    assert_same(tiled, G.w4a16_repack(qweight))
    assert_same(G.w4a16_unrepack(tiled), codes)


@pytest.mark.parametrize("m", [1, 2, 33])
@pytest.mark.parametrize("group,sym", [(128, True), (32, False), (-1, False), (16, True), (64, False)])
@pytest.mark.parametrize("dtype", ACT)
def test_gemm_equals_reference(metal, executor, m, group, sym, dtype):
    n, k = 192, 256  # 3 weight blocks; 33 rows: a second, partly empty row tile of the GEMM
    _q, tiled, scales, zeros = quantized_operands(n, k, group, sym, dtype, seed=m)
    x = torch.randn(m, k, generator=gen(m + 1)).to(dtype)
    y = _run(metal, "w4a16_gemm", (x, tiled, scales, zeros, group))
    assert executor.kernels[-1] == ("cal_w4a16_gemv" if m == 1 else "cal_w4a16_gemm")
    assert y.shape == (m, n) and y.dtype == dtype
    w = G.w4a16_dequantize(tiled, scales, zeros, group)
    exact = x.double() @ w.double().T
    lowp = G.w4a16_gemm(x, tiled, scales, zeros, group)
    assert_close_2x(y, exact, lowp, atol=1e-3 * float(exact.abs().max()), what=f"m={m} g={group} sym={sym} {dtype}")


@pytest.mark.parametrize("m", [1, 3])
def test_gemm_dequantizes_like_the_reference(metal, m):
    # x = one-hot rows: y[r, n] is the dequantized W[n, k_r] itself (one product by 1, sums of exact zeros)
    _q, tiled, scales, zeros = quantized_operands(64, 128, 32, False, torch.bfloat16, seed=7)
    ks = [5, 64, 127][:m]
    x = torch.zeros(m, 128, dtype=torch.bfloat16)
    x[torch.arange(m), ks] = 1
    y = _run(metal, "w4a16_gemm", (x, tiled, scales, zeros, 32))
    w = G.w4a16_dequantize(tiled, scales, zeros, 32)
    assert_same(y, w[:, ks].T.contiguous())


def test_gemm_leading_dims(metal):
    _q, tiled, scales, zeros = quantized_operands(64, 128, 64, True, torch.float16, seed=3)
    x = torch.randn(2, 3, 128, generator=gen(5)).half()
    y = _run(metal, "w4a16_gemm", (x, tiled, scales, zeros, 64))
    assert y.shape == (2, 3, 64)
    w = G.w4a16_dequantize(tiled, scales, zeros, 64)
    exact = x.reshape(6, 128).double() @ w.double().T
    lowp = G.w4a16_gemm(x, tiled, scales, zeros, 64).reshape(6, 64)
    assert_close_2x(y.reshape(6, 64), exact, lowp, atol=1e-3 * float(exact.abs().max()), what="leading dims")


@pytest.mark.parametrize("m", [1, 4])
def test_gemm_under_a_skewed_thread_start(harness_lib, m):
    # high thread indices start first: a threadgroup read not ordered by a barrier would see stale data
    from calibra import _metal
    from tests.metal.harness_exec import HarnessExecutor

    skewed = _metal.Backend(HarnessExecutor(harness_lib, skew_us=40))
    _q, tiled, scales, zeros = quantized_operands(64, 128, 32, False, torch.float16, seed=11)
    x = torch.randn(m, 128, generator=gen(12)).half()
    y = _run(skewed, "w4a16_gemm", (x, tiled, scales, zeros, 32))
    assert_same(y, _run(_metal.Backend(HarnessExecutor(harness_lib)), "w4a16_gemm", (x, tiled, scales, zeros, 32)))
