"""calibra.finite: the one-pass NaN/Inf check agrees with torch.isfinite on every float dtype."""

import pytest
import torch

from calibra.finite import all_finite, first_nonfinite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_any_bad_element_is_found(dtype, value):
    g = torch.Generator().manual_seed(0)
    for pos in (0, 1, 4095, 76 * 64 + 5):
        t = torch.randn(77, 64, generator=g).to(dtype)
        assert all_finite(t) and first_nonfinite(t) is None
        t.view(-1)[pos] = value
        assert not all_finite(t)
        assert first_nonfinite(t) == (pos // 64, pos % 64)
        assert not all_finite(t[:, pos % 64])  # a strided view is checked too


def test_first_of_several_in_row_major_order():
    t = torch.zeros(5, 6)
    t[3, 1] = float("nan")
    t[1, 4] = float("-inf")
    assert first_nonfinite(t) == (1, 4)


def test_extreme_finite_values_pass():
    t = torch.tensor([torch.finfo(torch.float32).max, torch.finfo(torch.float32).min, 0.0, -0.0])
    assert all_finite(t)  # a float32 sum of these would overflow; a min/max pass does not


def test_tensors_without_nonfinite_values():
    assert all_finite(torch.empty(0, 3))
    assert all_finite(torch.arange(10))
    assert all_finite(torch.ones(3, dtype=torch.bool))
    assert all_finite(torch.tensor(1.5))
    assert not all_finite(torch.tensor(float("nan")))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_tensors_an_fp8_checkpoint_holds(dtype):
    """FP8 scales (NVFP4 / FP8 checkpoints): the CPU has no min/max kernel for them; NaN is still found."""
    t = torch.tensor([0.5, -448.0 if dtype == torch.float8_e4m3fn else -57344.0, 3.0]).to(dtype)
    assert all_finite(t)
    t[1] = float("nan")
    assert not all_finite(t)
    assert first_nonfinite(t) == (1,)
