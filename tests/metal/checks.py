"""Comparison helpers shared by the Metal harness tests."""

from __future__ import annotations

import torch


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.is_floating_point():
        g, w = got.float(), want.float()
        same = (g == w) | (torch.isnan(g) & torch.isnan(w))
    else:
        same = got == want
    if not bool(same.all()):
        bad = (~same).nonzero()[0].tolist()
        raise AssertionError(
            f"{int((~same).sum())} of {same.numel()} differ, first at {bad}: {got[tuple(bad)]} vs {want[tuple(bad)]}"
        )
