"""calibra::hadamard against its reference and against the dense Hadamard matrix."""

import math

import pytest
import torch

import calibra
from calibra.ops import _ref
from tests.ops.harness import DEVICES, assert_close_2x, noncontiguous, run_native


def sylvester(n: int, dtype=torch.float64) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def dense_blockwise(x: torch.Tensor, b: int) -> torch.Tensor:
    """x @ blockdiag(H_b) / sqrt(b), in fp64: the exact value."""
    n = x.shape[-1]
    xb = x.double().reshape(*x.shape[:-1], n // b, b)
    return (xb @ sylvester(b) / math.sqrt(b)).reshape(x.shape)


SHAPES = [  # (shape, block_size)
    ((1, 1), None),
    ((7, 2), None),
    ((5, 64), None),
    ((3, 4, 256), None),
    ((2, 4096), None),
    ((9, 96), 32),
    ((4, 768), 128),
    ((3, 80), 16),
    ((0, 64), None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,block", SHAPES)
def test_fp32_equals_reference_and_dense(device, shape, block):
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    ours = run_native("hadamard", lambda: calibra.ops.hadamard(x, block), device)
    ref = _ref.hadamard(x.cpu(), -1 if block is None else block)
    # same butterflies in the same order in fp32: equal to the bit on CPU
    if device == "cpu":
        assert torch.equal(ours, ref)
    exact = dense_blockwise(x.cpu(), shape[-1] if block is None else block)
    torch.testing.assert_close(ours.cpu().double(), exact, rtol=0, atol=1e-5 * math.log2(max(2, shape[-1])))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_2x_of_torch(device, dtype):
    torch.manual_seed(1)
    x = torch.randn(16, 512, device=device).to(dtype)
    ours = run_native("hadamard", lambda: calibra.ops.hadamard(x), device)
    assert ours.dtype == dtype
    exact = dense_blockwise(x.cpu(), 512)
    lowp = (x.cpu() @ sylvester(512, dtype)) / math.sqrt(512)  # torch's own low-precision matmul
    assert_close_2x(ours, exact, lowp, atol=1e-3, what=f"hadamard {dtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_float64(device):
    if device == "mps":
        pytest.skip("MPS has no float64")
    x = torch.randn(4, 128, dtype=torch.float64, device=device)
    ours = run_native("hadamard", lambda: calibra.ops.hadamard(x), device)
    torch.testing.assert_close(ours.cpu(), dense_blockwise(x.cpu(), 128), rtol=0, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_input(device):
    x = torch.randn(6, 3, 64, device=device)
    xs = noncontiguous(x)
    xt = x.transpose(0, 1)  # strided leading dims
    for inp in (xs, xt):
        ours = run_native("hadamard", lambda: calibra.ops.hadamard(inp), device)
        assert ours.is_contiguous()
        assert torch.equal(ours.cpu(), _ref.hadamard(inp.cpu().contiguous(), -1))


@pytest.mark.parametrize("device", DEVICES)
def test_involution(device):
    x = torch.randn(8, 1024, device=device)
    y = calibra.ops.hadamard(calibra.ops.hadamard(x))
    torch.testing.assert_close(y, x, rtol=0, atol=1e-5)


def test_opcheck():
    x = torch.randn(4, 64)
    torch.library.opcheck(torch.ops.calibra.hadamard.default, (x, -1))
    torch.library.opcheck(torch.ops.calibra.hadamard.default, (torch.randn(2, 96), 32))


@pytest.mark.parametrize(
    "x,block,err,match",
    [
        (torch.randn(3, 48), None, ValueError, r"\[hadamard\] the last dim of x is 48, not a power of two"),
        (torch.randn(3, 48), 32, ValueError, r"\[hadamard\] block_size 32 does not divide"),
        (torch.randn(3, 64), 24, ValueError, r"\[hadamard\] block_size must be a power of two"),
        (torch.randn(3, 64), 1, ValueError, r"\[hadamard\] block_size must be a power of two"),
        (torch.ones(3, 64, dtype=torch.int32), None, TypeError, r"\[hadamard\] x must be one of"),
        (torch.tensor(1.0), None, ValueError, r"\[hadamard\] x must have at least 1 dims"),
    ],
)
def test_bad_input(x, block, err, match):
    with pytest.raises(err, match=match):
        calibra.ops.hadamard(x, block)


def test_nan_propagates():
    # NaN policy for hadamard: not checked (a linear map), NaN/Inf propagate into their block only.
    x = torch.randn(2, 64)
    x[0, 5] = float("nan")
    y = calibra.ops.hadamard(x, 32)
    assert torch.isnan(y[0, :32]).all() and torch.isfinite(y[0, 32:]).all() and torch.isfinite(y[1]).all()
