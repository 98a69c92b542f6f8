"""FP8 E4M3 math (calibra.quant.fp8) against compressed-tensors' own code, the static-scale policy for
MoE experts without tokens, and the KV-cache stand-in (calibra.quant.kv_fp8)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from calibra.quant import RTNConfig, rtn_quantize
from calibra.quant.activations import static_input_quant
from calibra.quant.fp8 import FP8_DTYPE, dynamic_token_scale, fp8_fake_quant, fp8_fake_quant_dynamic

ct = pytest.importorskip("compressed_tensors")


def _x(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[-1])  # channels over 3 decades
    x[0, 0] = 0.0  # an all-zero token: the eps rule, not a division by 0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_token_matches_compressed_tensors(dtype):
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

    args = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).input_activations
    x = _x((2, 7, 96), dtype)
    x[0, 0].zero_()
    scale, zp = compute_dynamic_scales_and_zp(x, args, module=None)
    assert torch.equal(dynamic_token_scale(x), scale)
    want = fake_quantize(x, scale, zp, args)
    got = fp8_fake_quant_dynamic(x)
    assert torch.equal(got, want.to(dtype))
    assert torch.isfinite(got).all() and not torch.equal(got, x)  # the quantization is visible


def test_weight_channel_matches_compressed_tensors_compressor():
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    w = _x((48, 64), seed=1)
    ql = rtn_quantize(w, RTNConfig(bits=8, group_size=-1, format="fp8"))
    assert ql.codes.dtype == FP8_DTYPE and tuple(ql.scales.shape) == (48, 1)
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    # compressed-tensors' compressor from our scales gives our codes; its decompressor gives our weight
    comp = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": ql.scales}, scheme)
    assert torch.equal(comp["weight"].view(torch.uint8), ql.codes.view(torch.uint8))
    dec = FloatQuantizationCompressor.decompress({"weight": ql.codes, "weight_scale": ql.scales}, scheme)
    assert torch.equal(dec["weight"], ql.weight)
    assert torch.equal(ql.dequantize(), ql.weight)


def test_static_tensor_matches_compressed_tensors():
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    args = preset_name_to_scheme("FP8", ["Linear"]).input_activations
    x = _x((3, 5, 32))
    scale = torch.tensor([0.01])  # deliberately small: values beyond +-448 * scale saturate
    assert torch.equal(fp8_fake_quant(x, scale), fake_quantize(x, scale, torch.zeros(1), args))


def _stats(ranges: dict[str, tuple[torch.Tensor, torch.Tensor, int]]):
    tensors, counts = {}, {}
    for key, (lo, hi, n) in ranges.items():
        if n:
            tensors[f"ranges/min/{key}"], tensors[f"ranges/max/{key}"] = lo, hi
        counts[key] = n
    return SimpleNamespace(tensors=tensors, count=lambda kind, key: counts.get(key, 0))


def _target(name, expert=True):
    return SimpleNamespace(name=name, stats_key=name, expert=expert)


def test_expert_without_tokens_gets_recorded_fallback():
    blk = "model.layers.0.mlp.experts"
    ranges = {
        f"{blk}.0.gate_up_proj": (torch.tensor([-2.0, 0.5]), torch.tensor([1.0, 3.0]), 5),
        f"{blk}.1.gate_up_proj": (torch.tensor([-4.0, 0.1]), torch.tensor([1.0, 1.0]), 3),
        f"{blk}.2.gate_up_proj": (None, None, 0),  # no calibration token reached expert 2
        f"{blk}.0.down_proj": (torch.tensor([-1.0]), torch.tensor([2.0]), 5),
        f"{blk}.1.down_proj": (torch.tensor([-0.5]), torch.tensor([0.5]), 3),
        f"{blk}.2.down_proj": (None, None, 0),
    }
    iq = static_input_quant(_stats(ranges), [_target(k) for k in ranges], torch.float32)
    assert float(iq[f"{blk}.0.gate_up_proj"].scale) == pytest.approx(3.0 / 448)
    assert float(iq[f"{blk}.1.gate_up_proj"].scale) == pytest.approx(4.0 / 448)
    fb = iq[f"{blk}.2.gate_up_proj"]
    assert fb.fallback and "2 experts" in fb.fallback and fb.tokens == 0
    assert float(fb.scale) == pytest.approx(4.0 / 448)  # the block's largest gate_up input
    assert float(iq[f"{blk}.2.down_proj"].scale) == pytest.approx(2.0 / 448)
    assert all(torch.isfinite(q.scale).all() and float(q.scale) > 0 for q in iq.values())
    assert iq[f"{blk}.0.down_proj"].fallback is None


def test_linear_without_tokens_is_an_error():
    ranges = {"model.layers.0.self_attn.q_proj": (None, None, 0)}
    with pytest.raises(ValueError, match="no calibration token reached the input of"):
        static_input_quant(_stats(ranges), [_target(k, expert=False) for k in ranges], torch.float32)


def test_kv_stand_in_quantizes_what_the_cache_stores():
    """With a real cache (generation), the cache receives and returns the quantized K/V."""
    from transformers import DynamicCache

    from calibra.quant import kv_fp8
    from tests.export import _qmodel as Q

    model = Q.tiny_llama()
    from calibra.models import get_adapter

    ad = get_adapter(model)
    scales = {i: (torch.tensor([0.002]), torch.tensor([0.003])) for i in range(len(ad.layers))}
    kv_fp8.install(model, ad, scales)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=Q.ids(), cache=cache, use_cache=True)
    k = cache.layers[0].keys
    assert torch.equal(fp8_fake_quant(k, scales[0][0]), k)  # stored values are already on the FP8 grid
    kv_fp8.remove(model)
    cache2 = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=Q.ids(), cache=cache2, use_cache=True)
    assert not torch.equal(cache2.layers[0].keys, k)  # without the hooks the cache holds the raw keys


def test_percentile_observer_clips_below_absmax():
    """The percentile scale comes from the range histogram: below the absmax when a few values are outliers,
    never above it."""
    from calibra.calib.observers import RangeObserver

    obs = RangeObserver()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g)
    x[0, 3] = 80.0  # one outlier value among 64000
    obs.linear("m", x)
    stats = SimpleNamespace(tensors=obs.tensors, count=lambda kind, key: 4000)
    t = [_target("m", expert=False)]
    full = float(static_input_quant(stats, t, torch.float32)["m"].scale) * 448
    clipped = float(static_input_quant(stats, t, torch.float32, clip_percentile=99.99)["m"].scale) * 448
    assert full == pytest.approx(80.0)
    assert 3.0 < clipped < 6.0  # the 99.99th percentile of |N(0, 1)| is ~3.9, one 1/16-octave bin up
    assert float(static_input_quant(stats, t, torch.float32, clip_percentile=100.0)["m"].scale) * 448 <= full


def test_report_section_lists_fallbacks_and_kv_scales():
    from calibra.report import _sections

    rep = {
        "activation_quant": {
            "scheme": "fp8",
            "format": "fp8",
            "dynamic": False,
            "observer": "absmax",
            "fallbacks": ["model.layers.0.mlp.experts.2.down_proj"],
            "not_simulated": [],
            "modules": {
                "model.layers.0.self_attn.q_proj": {"dynamic": False, "scale": 0.01, "tokens": 9, "fallback": None},
                "model.layers.0.mlp.experts.2.down_proj": {
                    "dynamic": False,
                    "scale": 0.02,
                    "tokens": 0,
                    "fallback": "no token",
                },
            },
        },
        "kv_cache": {"format": "fp8", "scales": {"model.layers.0.self_attn": {"k_scale": 0.5, "v_scale": 0.25}}},
    }
    html = "".join(_sections.activation_quant(rep).parts)
    assert "1 with a fallback scale" in html and "no token" in html and "model.layers.0.mlp.experts.2.down_proj" in html
    assert "model.layers.0.self_attn" in html and "0.25" in html
    assert _sections.activation_quant({}) is None
    from calibra.report import _plots

    if _plots.available():  # the input scales and the k/v scales are plotted (the tables follow)
        assert html.count("<svg") == 2
