"""QuantizedLayer.dequantize: contiguous groups broadcast their scales; the result equals the general
gather over g_idx bit for bit (checkpoints and exports compare it with the solver's weight exactly)."""

import dataclasses

import pytest
import torch

from calibra.quant.result import ModuleLog, QuantizedLayer


def _layer(out, n, gs, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if gs == -1 else n // gs
    log = ModuleLog("m", 0, "rtn", 0.0, 0, 0.0, 0.0, 0, False, 0, 0, 0.0)
    return QuantizedLayer(
        name="m",
        method="rtn",
        format="int",
        bits=4,
        group_size=gs,
        symmetric=False,
        codes=torch.randint(0, 16, (out, n), dtype=torch.uint8, generator=g),
        scales=(torch.rand(out, groups, generator=g) * 0.1 + 1e-3).to(dtype),
        zeros=torch.randint(0, 16, (out, groups), dtype=torch.uint8, generator=g),
        g_idx=None,
        global_scale=None,
        weight=torch.empty(out, n, dtype=dtype),
        rotation=None,
        log=log,
    )


@pytest.mark.parametrize("gs", [32, 128, -1])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_contiguous_groups_equal_the_gather(gs, dtype):
    ql = _layer(24, 256, gs, dtype, seed=gs + 7)
    fast = ql.dequantize()
    explicit = torch.arange(256, dtype=torch.int32) // (256 if gs == -1 else gs)
    slow = dataclasses.replace(ql, g_idx=explicit).dequantize()  # the gather path
    assert fast.dtype == dtype and fast.shape == (24, 256)
    assert torch.equal(fast, slow)
    # and both are (codes - zero) * scale of each element's own group
    r, c = 5, 200
    grp = 0 if gs == -1 else c // gs
    want = (ql.codes[r, c].float() - ql.zeros[r, grp].float()) * ql.scales[r, grp].float()
    assert fast[r, c] == want.to(dtype)
