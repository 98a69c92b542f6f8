"""calibra.quant.fp4_act: NVFP4 / MXFP4 activation quantize-dequantize bit for bit as compressed-tensors 0.20
computes it for its NVFP4 and MXFP4 presets' inputs, the global-scale rule, and the static NVFP4 global
scales (with the MoE fallback) from calibration ranges."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from calibra.quant.activations import static_input_quant
from calibra.quant.fp4_act import e2m1_round, mxfp4_fake_quant, nvfp4_fake_quant, nvfp4_global_scale

ct = pytest.importorskip("compressed_tensors")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _ct_fake_quant(x, preset: str, global_scale=None):
    """compressed-tensors' own dynamic path for a Linear input (forward_quantize without a module)."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = preset_name_to_scheme(preset, ["Linear"]).input_activations
    scale, zp = compute_dynamic_scales_and_zp(x, args, None, global_scale=global_scale)
    return fake_quantize(x, scale, zp, args, global_scale=global_scale)


def _x(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # magnitudes over five decades, one all-zero group, and exact ties of the E2M1 grid
    x = torch.randn(3, 7, 64, generator=g) * torch.logspace(-3, 2, 64)
    x[0, 0, :32] = 0
    x[1, 1, :16] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2) * torch.tensor([1.0, -1.0]).repeat(8)
    return x.to(dtype)


def test_e2m1_rounding_ties_to_even_codes():
    got = e2m1_round(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.3, -5.1]))
    assert got.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5, -6.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gscale_factor", [1.0, 50.0])  # 50: too small an input range, local scales saturate
def test_nvfp4_equals_compressed_tensors(dtype, gscale_factor):
    x = _x(dtype)
    g = nvfp4_global_scale(x.float().abs().amax()) * gscale_factor
    want = _ct_fake_quant(x, "NVFP4", g)
    got = nvfp4_fake_quant(x, g)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    assert not torch.equal(got, x)  # it quantizes


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_equals_compressed_tensors(dtype):
    x = _x(dtype, seed=1)
    want = _ct_fake_quant(x, "MXFP4")
    got = mxfp4_fake_quant(x)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    assert not torch.equal(got, x)


def test_global_scale_rule_matches_compressed_tensors():
    from compressed_tensors.quantization.utils import generate_gparam

    for amax in (3.7, 1e-30, 0.0, 250.0):
        a = torch.tensor([amax])
        assert torch.equal(nvfp4_global_scale(a), generate_gparam(-a, a))
    assert float(nvfp4_global_scale(torch.tensor(0.0))) == 1.0  # an all-zero input: no global scaling


def test_hidden_size_must_divide_into_groups():
    with pytest.raises(ValueError, match="divisible by 16"):
        nvfp4_fake_quant(torch.ones(2, 24), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="divisible by 32"):
        mxfp4_fake_quant(torch.ones(2, 48))


def test_static_nvfp4_global_scales_with_expert_fallback():
    blk = "model.layers.0.mlp.experts"
    ranges = {
        f"{blk}.0.down_proj": (torch.tensor([-1.0]), torch.tensor([2.0]), 5),
        f"{blk}.1.down_proj": (torch.tensor([-4.0]), torch.tensor([0.5]), 3),
        f"{blk}.2.down_proj": (None, None, 0),  # no calibration token reached expert 2
    }
    tensors, counts = {}, {}
    for key, (lo, hi, n) in ranges.items():
        if n:
            tensors[f"ranges/min/{key}"], tensors[f"ranges/max/{key}"] = lo, hi
        counts[key] = n
    stats = SimpleNamespace(tensors=tensors, count=lambda kind, key: counts.get(key, 0))
    targets = [SimpleNamespace(name=k, stats_key=k, expert=True) for k in ranges]
    iq = static_input_quant(stats, targets, torch.bfloat16, format="nvfp4")
    assert all(q.scale.dtype == torch.float32 and q.format == "nvfp4" and not q.dynamic for q in iq.values())
    assert float(iq[f"{blk}.0.down_proj"].scale) == pytest.approx(448 * 6 / 2.0)
    assert float(iq[f"{blk}.1.down_proj"].scale) == pytest.approx(448 * 6 / 4.0)
    fb = iq[f"{blk}.2.down_proj"]
    # the block's largest input range: the smallest global scale, so no token the expert may get saturates
    assert fb.fallback and fb.tokens == 0 and float(fb.scale) == pytest.approx(448 * 6 / 4.0)
    assert all(torch.isfinite(q.scale).all() and float(q.scale) > 0 for q in iq.values())
