"""INT8 activation math (calibra.quant.int8) bit for bit against compressed-tensors' own code, and the
SmoothQuant search's pieces (calibra.quant.smoothquant): the smoothed Hessian identity GPTQ relies on, the
search keeping the measured best, never worse than no smoothing."""

from __future__ import annotations

import pytest
import torch

from calibra.quant.int8 import dynamic_token_scale, int8_fake_quant, int8_fake_quant_dynamic, int8_scale

ct = pytest.importorskip("compressed_tensors")


def _x(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[-1])  # channels over 3 decades
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_token_matches_compressed_tensors(dtype):
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = preset_name_to_scheme("W8A8", ["Linear"]).input_activations
    x = _x((2, 7, 96), dtype)
    x[0, 0].zero_()  # an all-zero token: the eps rule, not a division by 0
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    assert torch.equal(dynamic_token_scale(x), scale)
    got = int8_fake_quant_dynamic(x)
    assert torch.equal(got, fake_quantize(x, scale, zp, args).to(dtype))
    assert torch.isfinite(got).all() and not torch.equal(got, x)
    # on the int8 grid: at most 256 distinct values per token
    assert all(len(torch.unique(got[1, t])) <= 256 for t in range(7))


def test_static_tensor_matches_compressed_tensors():
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)
    x = _x((3, 5, 64), seed=2)
    amax = x.abs().amax().reshape(1) * 0.5  # half the range: the rest saturates at -128 / 127
    scale, zp = calculate_qparams(-amax, amax, args)
    assert torch.equal(int8_scale(amax), scale)
    assert torch.equal(int8_fake_quant(x, scale), fake_quantize(x, scale, zp, args))
    assert float(int8_fake_quant(x, scale).max()) == pytest.approx(127 * float(scale))


def test_int8_weights_match_compressed_tensors_compressor():
    """calibra's symmetric int8 per channel is compressed-tensors' W8A8 weight: same scale, codes - 128."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    from calibra.quant import RTNConfig, rtn_quantize

    w = _x((48, 64), seed=1)
    ql = rtn_quantize(w, RTNConfig(bits=8, group_size=-1, sym=True))
    scheme = preset_name_to_scheme("W8A8", ["Linear"])
    comp = IntQuantizationCompressor.compress({"weight": w, "weight_scale": ql.scales}, scheme)
    assert torch.equal(comp["weight"].to(torch.int16), ql.codes.to(torch.int16) - 128)
    dec = IntQuantizationCompressor.decompress(comp, scheme)
    assert torch.equal(dec["weight"], ql.weight)


def test_smoothed_inputs_have_the_transformed_hessian():
    """Inputs divided by s have the Hessian diag(1/s) H diag(1/s): what GPTQ solves on after folding."""
    x = _x((200, 32), torch.float64, seed=3)
    s = torch.linspace(0.5, 4.0, 32, dtype=torch.float64)
    h = x.T @ x
    xs = x / s
    assert torch.allclose(xs.T @ xs, h / s[:, None] / s[None, :], rtol=1e-12, atol=0)


@pytest.mark.parametrize("gptq", [False, True])
@pytest.mark.parametrize("dynamic", [True, False])
def test_search_keeps_the_measured_best_and_never_worse_than_off(dynamic, gptq):
    from calibra.quant import GPTQConfig
    from calibra.quant.smoothquant import SmoothConfig, output_error, search

    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 64, generator=g)
    x[:, 3] *= 60.0  # an outlier channel: the case SmoothQuant is for
    w = torch.randn(96, 64, generator=g) * 0.05
    amax = x.abs().amax(0)
    # scored with GPTQ's weights (on each candidate's smoothed Hessian, as the job solves them) or RTN's
    kw = dict(hessian=(x.T @ x, x.shape[0]), gptq=GPTQConfig(bits=8, group_size=-1, desc_act=True)) if gptq else {}
    alpha, s, errors = search(x, amax, w, SmoothConfig(), dynamic=dynamic, **kw)
    assert set(errors) == {"off"} | {f"{a:g}" for a in SmoothConfig().alphas}
    kept = "off" if alpha is None else f"{alpha:g}"
    assert errors[kept] == min(errors.values())
    assert alpha is not None and errors[kept] < 0.5 * errors["off"]  # smoothing pays off with an outlier
    assert output_error(x, w, s, dynamic=dynamic, act_amax=amax, **kw) == pytest.approx(errors[kept])
    if gptq:  # GPTQ's weights fit the calibration inputs better than RTN's
        assert errors["off"] < output_error(x, w, None, dynamic=dynamic, act_amax=amax)
    # without outliers and with a flat weight, no smoothing may win; then nothing is folded
    alpha0, s0, errors0 = search(x[:, 4:], x[:, 4:].abs().amax(0), w[:, 4:], SmoothConfig(mode="off"), dynamic=dynamic)
    assert alpha0 is None and s0 is None and list(errors0) == ["off"]


def test_parse_smoothquant():
    from calibra.quant.scheme import scheme_configs
    from calibra.quant.smoothquant import parse_smoothquant

    _, int8 = scheme_configs("int8")
    _, fp8 = scheme_configs("fp8")
    assert parse_smoothquant(None, int8).mode == "search"
    assert parse_smoothquant(None, fp8) is None and parse_smoothquant(None, None) is None
    assert parse_smoothquant("0.3", int8).alpha == 0.3 and parse_smoothquant("off", int8).candidates == (None,)
    with pytest.raises(ValueError, match="applies to --scheme w8a8"):
        parse_smoothquant("search", fp8)
