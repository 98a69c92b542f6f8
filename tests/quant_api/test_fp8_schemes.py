"""--scheme fp8 / fp8-dynamic and --kv-cache fp8 end to end: refusals before loading, the calibra folder
round trip (scales kept, simulation reinstalled on load), the compressed-tensors export loaded back by
transformers + compressed-tensors on the CPU and compared with calibra's simulated model, MoE experts."""

from __future__ import annotations

import json

import pytest
import torch

import calibra
from tests.quant_api._schemes import TOL
from tests.quant_api._schemes import logits as _logits
from tests.quant_api._schemes import quantize_quiet as _q
from tests.quant_api._schemes import rel as _rel


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(scheme="fp8", config=calibra.RTNConfig()), "either config or scheme"),
        (dict(scheme="int4"), "unknown scheme"),
        (dict(kv_cache="int4", config=calibra.RTNConfig()), "kv_cache must be one of"),
        (dict(scheme="fp8", export="gptq"), "only compressed-tensors"),
        (dict(scheme="fp8-dynamic", mixed_precision=4.5), "--mixed-precision"),
        (dict(scheme="fp8", act_ranges=True), "--act-ranges"),
        (dict(scheme="fp8", stream=True), "--stream"),
        (dict(config=calibra.RTNConfig(), kv_cache="fp8", export="mlx"), "only compressed-tensors"),
        (dict(), "give a config"),
        (dict(scheme="fp8-dynamic", act_observer="percentile"), "chooses static scales"),
        (dict(config=calibra.RTNConfig(), act_observer="percentile"), "needs scheme='fp8'"),
        (dict(scheme="fp8", act_observer="percentile", act_clip_percentile=30.0), "clip_percentile must be"),
    ],
)
def test_refused_before_loading(llama_folder, tmp_path, no_load, kw, match):
    with pytest.raises(ValueError, match=match):
        _q(llama_folder, tmp_path / "out", **kw)


def test_cli_refuses_weight_only_flags_with_a_scheme(no_load, tmp_path):
    from calibra.cli import main

    with pytest.raises(ValueError, match="--group-size does not apply"):
        main(["quantize", "--input", "builtin:tiny-llama", "--output", str(tmp_path / "o"), "--scheme", "fp8",
              "--group-size", "32"])  # fmt: skip
    with pytest.raises(ValueError, match="exactly one of --method"):
        main(["quantize", "--input", "builtin:tiny-llama", "--output", str(tmp_path / "o")])


def test_weight_only_flag_defaults_match_the_parser():
    """The CLI refuses a weight-only flag that differs from its default: the table must hold the defaults."""
    from calibra.cli import _WEIGHT_ONLY_FLAGS, build_parser

    args = build_parser().parse_args(["quantize", "--input", "x", "--output", "y", "--scheme", "fp8"])
    for dest, flag, default in _WEIGHT_ONLY_FLAGS:
        assert getattr(args, dest) == default, flag


@pytest.mark.parametrize("scheme,kv", [("fp8-dynamic", None), ("fp8", "fp8")])
def test_calibra_folder_round_trip(llama_folder, tmp_path, scheme, kv):
    from calibra.eval import _load_quantize_output

    qm, rep = _q(llama_folder, tmp_path / "q", scheme=scheme, kv_cache=kv)
    man = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert man["activations"]["scheme"] == scheme
    mods = man["activations"]["modules"]
    assert set(mods) == set(qm.layers)
    if scheme == "fp8":
        assert all(m["scale"] > 0 and m["tokens"] > 0 for m in mods.values())
        assert set(man["kv_cache"]["scales"]) == {f"model.layers.{i}.self_attn" for i in range(2)}
        assert rep["kv_cache"]["scales"] == man["kv_cache"]["scales"]
    loaded, _ = _load_quantize_output(tmp_path / "q", "float32", None)
    a, b = _logits(loaded), _logits(qm.model)
    assert torch.equal(a, b)  # the same weights and the same simulated inputs / KV cache
    # the simulation is on: without its hooks the logits differ
    from calibra.quant import activations, kv_fp8

    activations.remove(loaded)
    kv_fp8.remove(loaded)
    assert _rel(_logits(loaded), b) > 10 * TOL * 1e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scheme", ["fp8-dynamic", "fp8"])
def test_compressed_tensors_export_loads_and_matches(llama_folder, tmp_path, scheme, dtype):
    """transformers + compressed-tensors 0.20 load the export and compute calibra's simulation: the same
    FP8 weights, the same per-token or static FP8 inputs (their own forward hooks)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
    from transformers import AutoModelForCausalLM

    qm, _ = _q(llama_folder, tmp_path / "ct", scheme=scheme, export="compressed-tensors", dtype=dtype)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == "float-quantized"
    preset = preset_name_to_scheme("FP8_DYNAMIC" if scheme == "fp8-dynamic" else "FP8", ["Linear"])
    assert QuantizationArgs(**group["input_activations"]) == preset.input_activations
    w = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]).weights  # per-channel weights in both schemes
    assert QuantizationArgs(**group["weights"]) == w
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=getattr(torch, dtype))
    lin = loaded.model.layers[0].self_attn.q_proj
    assert lin.quantization_scheme.input_activations.dynamic is (scheme == "fp8-dynamic")
    if scheme == "fp8":
        assert torch.equal(lin.input_scale.reshape(1), qm.input_quant["model.layers.0.self_attn.q_proj"].scale)
    ref = _logits(qm.model)
    assert _rel(_logits(loaded), ref) <= TOL
    # the comparison can fail: calibra's model without its simulated inputs is measurably different
    from calibra.quant import activations

    activations.remove(qm.model)
    assert _rel(_logits(qm.model), ref) > TOL


def test_kv_cache_export_matches_compressed_tensors_quantizer(llama_folder, tmp_path):
    """kv_cache_scheme + k_scale/v_scale under the attention module (the names vLLM reads). transformers
    5.25 renamed the attention's cache keyword to ``cache``, which compressed-tensors 0.20 does not recognize
    (``is_cached_attention_module`` looks for ``past_key_values``), so its loader ignores the scales; the
    scales and the K/V rounding are therefore checked with compressed-tensors' own quantizer."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from safetensors.torch import load_file

    # GPTQ: the KV scales are measured on the finished model after the Hessian-driven layer loop
    qm, rep = _q(llama_folder, tmp_path / "kv", config=calibra.GPTQConfig(bits=4, group_size=32), kv_cache="fp8",
                 export="compressed-tensors")  # fmt: skip
    assert rep["settings"]["kv_cache"] == "fp8" and rep["settings"]["method"] == "gptq"
    qc = json.loads((tmp_path / "kv" / "config.json").read_text())["quantization_config"]
    args = QuantizationArgs(**qc["kv_cache_scheme"])
    assert args.num_bits == 8 and args.type == "float" and args.strategy == "tensor" and not args.dynamic
    tensors = {}
    for f in (tmp_path / "kv").glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    g = torch.Generator().manual_seed(1)
    for i, (k, v) in qm.kv_scales.items():
        ks, vs = tensors[f"model.layers.{i}.self_attn.k_scale"], tensors[f"model.layers.{i}.self_attn.v_scale"]
        assert torch.equal(ks, k) and torch.equal(vs, v) and float(ks) > 0
        x = torch.randn(2, 2, 9, 16, generator=g) * float(ks) * 300  # [batch, kv heads, seq, head_dim]
        from calibra.quant.fp8 import fp8_fake_quant

        assert torch.equal(fp8_fake_quant(x, ks), fake_quantize(x, ks, None, args))


def test_moe_experts_get_finite_recorded_scales(moe_folder, tmp_path):
    qm, rep = _q(moe_folder, scheme="fp8")
    experts = [n for n in qm.layers if ".experts." in n]
    assert len(experts) == 2 * 4 * 2
    for n in experts:
        iq = qm.input_quant[n]
        assert torch.isfinite(iq.scale).all() and float(iq.scale) > 0
        assert (iq.tokens > 0) != (iq.fallback is not None)  # its own tokens, or a recorded fallback
    aq = rep["activation_quant"]
    assert aq["not_simulated"] == []  # fused experts too: their per-expert linears are quantized
    assert aq["fallbacks"] == sorted(n for n in experts if qm.input_quant[n].fallback)
    # transformers would load these experts dense and run them on unquantized inputs: not exported
    with pytest.raises(calibra.export.ExportError, match="activation quantization of fused MoE experts"):
        calibra.export(qm, tmp_path / "ct", "compressed-tensors")


def test_fused_experts_inputs_simulated_per_expert(moe_folder):
    """The fused experts' simulation equals a hand-written per-expert loop with each expert's static scale."""
    from calibra.compat.transformers import fused_expert_weights
    from calibra.io import load_model
    from calibra.quant import activations
    from calibra.quant.fp8 import fp8_fake_quant

    model, _ = load_model(str(moe_folder))
    experts = model.model.layers[0].mlp.experts
    n = experts.gate_up_proj.shape[0]
    pre = "model.layers.0.mlp.experts"
    quant = {}
    for e in range(n):
        for proj, s in (("gate_up_proj", 0.001 * (e + 1)), ("down_proj", 0.0005 * (e + 1))):
            quant[f"{pre}.{e}.{proj}"] = activations.InputQuant(dynamic=False, scale=torch.tensor([s]))
    assert activations.install(model, quant) == []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, experts.gate_up_proj.shape[2], generator=g)
    top_k = torch.stack([torch.arange(10) % n, (torch.arange(10) + 1) % n], 1)
    weights = torch.full((10, 2), 0.5)
    with torch.no_grad():
        got = experts(x, top_k, weights)
        want = torch.zeros_like(x)
        for t in range(10):
            for k in range(2):
                e = int(top_k[t, k])
                wg, wu, wd = fused_expert_weights(experts, e)
                xi = fp8_fake_quant(x[t : t + 1], quant[f"{pre}.{e}.gate_up_proj"].scale)
                h = experts.act_fn(xi @ wg.T) * (xi @ wu.T)
                h = fp8_fake_quant(h, quant[f"{pre}.{e}.down_proj"].scale)
                want[t] += 0.5 * (h @ wd.T)[0]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    activations.remove(model)
    with torch.no_grad():
        assert not torch.allclose(experts(x, top_k, weights), want, rtol=1e-5, atol=1e-6)
