"""--scheme w8a8 / w8a8-static end to end: refusals before loading, the searched SmoothQuant strength
(recorded per group, folded into the norms, never worse than no smoothing on its own measure), the
calibra folder round trip, and the compressed-tensors ``int-quantized`` export loaded back by transformers
+ compressed-tensors on the CPU and compared with calibra's simulated model."""

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
        (dict(scheme="w8a8", config=calibra.GPTQConfig()), "either config or scheme"),
        (dict(scheme="w8a8", export="gptq"), "only compressed-tensors"),
        (dict(scheme="int8", act_ranges=True), "--act-ranges"),
        (dict(scheme="w8a8", act_observer="percentile"), "chooses static scales"),
        (dict(scheme="fp8", smoothquant="search"), "applies to --scheme w8a8"),
        (dict(config=calibra.RTNConfig(), smoothquant=0.5), "applies to --scheme w8a8"),
        (dict(scheme="w8a8-static", smoothquant=1.5), "alpha must be in"),
        (dict(scheme="w8a8", smoothquant="best"), "'search', 'off' or a strength"),
        (dict(scheme="w8a8", stream=True), "--stream"),
    ],
)
def test_refused_before_loading(llama_folder, tmp_path, no_load, kw, match):
    with pytest.raises(ValueError, match=match):
        _q(llama_folder, tmp_path / "out", **kw)


def test_cli_flags(no_load, tmp_path):
    from calibra.cli import build_parser, main

    args = build_parser().parse_args(["quantize", "--input", "x", "--output", "y", "--scheme", "int8"])
    assert args.scheme == "int8" and args.smoothquant is None
    with pytest.raises(ValueError, match="--bits does not apply"):
        main(["quantize", "--input", "builtin:tiny-llama", "--output", str(tmp_path / "o"), "--scheme", "w8a8",
              "--bits", "8"])  # fmt: skip
    with pytest.raises(ValueError, match="applies to --scheme w8a8"):
        main(["quantize", "--input", "builtin:tiny-llama", "--output", str(tmp_path / "o"), "--method", "gptq",
              "--smoothquant", "off"])  # fmt: skip


def test_searched_smoothing_is_recorded_and_folded(llama_folder):
    qm, rep = _q(llama_folder, scheme="int8")  # the alias
    assert rep["settings"]["scheme"] == "w8a8"
    sq = rep["smoothquant"]
    assert sq["mode"] == "search"
    groups = sq["groups"]
    # q/k/v behind input_layernorm and gate/up behind post_attention_layernorm, in both layers
    assert set(groups) == {
        f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    }
    for g in groups.values():
        kept = "off" if g["alpha"] is None else f"{g['alpha']:g}"
        assert g["errors"][kept] == min(g["errors"].values())  # the measured best is kept
        assert g["errors"][kept] <= g["errors"]["off"]  # never worse than no smoothing on its measure
        assert len(g["errors"]) == 12 and g["sample_tokens"] > 0
    assert sq["smoothed_groups"] == sum(g["alpha"] is not None for g in groups.values())
    # every quantized Linear: int8 per channel (GPTQ) and a per-token int8 input
    assert {(l.format, l.bits, l.group_size, l.symmetric) for l in qm.layers.values()} == {("int", 8, -1, True)}
    assert all(iq.format == "int8" and iq.dynamic for iq in qm.input_quant.values())
    assert set(qm.input_quant) == set(qm.layers)
    assert rep["settings"]["method"] == "gptq"
    from calibra.report import render_report

    html = render_report(rep)  # report.html shows the kept strength per group
    assert "SmoothQuant search" in html and "model.layers.1.post_attention_layernorm" in html


def test_smoothed_norms_change_only_where_smoothing_was_kept(llama_folder):
    from calibra.io import load_model

    ref, _ = load_model(str(llama_folder))
    qm, rep = _q(llama_folder, scheme="w8a8", smoothquant=0.5)  # fixed alpha: every group is smoothed
    groups = rep["smoothquant"]["groups"]
    assert all(g["alpha"] == 0.5 for g in groups.values())
    mods, ref_mods = dict(qm.model.named_modules()), dict(ref.named_modules())
    for norm in groups:
        assert not torch.allclose(mods[norm].weight, ref_mods[norm].weight)
    qm_off, rep_off = _q(llama_folder, scheme="w8a8", smoothquant="off")
    assert rep_off["smoothquant"]["smoothed_groups"] == 0
    mods = dict(qm_off.model.named_modules())
    for norm in groups:
        assert torch.equal(mods[norm].weight, ref_mods[norm].weight)


def test_static_scales_and_calibra_folder_round_trip(llama_folder, tmp_path):
    from calibra.eval import _load_quantize_output

    qm, rep = _q(llama_folder, tmp_path / "q", scheme="w8a8-static", act_observer="percentile", kv_cache="fp8")
    assert set(rep["kv_cache"]["scales"]) == {f"model.layers.{i}.self_attn" for i in range(2)}  # combines
    man = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert man["activations"]["scheme"] == "w8a8-static"
    mods = man["activations"]["modules"]
    assert set(mods) == set(qm.layers)
    assert all(m["format"] == "int8" and not m["dynamic"] and m["scale"] > 0 and m["tokens"] > 0 for m in mods.values())
    loaded, _ = _load_quantize_output(tmp_path / "q", "float32", None)
    assert torch.equal(_logits(loaded), _logits(qm.model))  # same weights, norms and simulated inputs
    from calibra.quant import activations, kv_fp8

    activations.remove(loaded)
    kv_fp8.remove(loaded)
    assert _rel(_logits(loaded), _logits(qm.model)) > 1e-5  # the simulation is on


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static"])
def test_compressed_tensors_export_loads_and_matches(llama_folder, tmp_path, scheme):
    """transformers + compressed-tensors 0.20 load the ``int-quantized`` export on the CPU (decompressing the
    int8 weights, quantizing the inputs with their own forward hooks) and compute calibra's simulation."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationArgs, preset_name_to_scheme
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    qm, _ = _q(llama_folder, tmp_path / "ct", scheme=scheme, export="compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == group["format"] == "int-quantized"
    preset = preset_name_to_scheme("W8A8", ["Linear"])
    assert QuantizationArgs(**group["weights"]) == preset.weights
    want_in = preset.input_activations
    if scheme == "w8a8-static":
        want_in = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)
    assert QuantizationArgs(**group["input_activations"]) == want_in
    tensors = {}
    for f in (tmp_path / "ct").glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    name = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.weight"].dtype == torch.int8 and f"{name}.weight_zero_point" not in tensors
    assert (f"{name}.input_scale" in tensors) is (scheme == "w8a8-static")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    lin = loaded.model.layers[0].self_attn.q_proj
    assert lin.quantization_scheme.input_activations.dynamic is (scheme == "w8a8")
    ql = qm.layers[name]
    assert torch.equal(lin.weight.to(torch.int16), ql.codes.to(torch.int16) - 128)  # kept compressed
    assert torch.equal(lin.weight_scale, ql.scales)
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor

    dec = IntQuantizationCompressor.decompress(
        {"weight": tensors[f"{name}.weight"], "weight_scale": tensors[f"{name}.weight_scale"]}, lin.quantization_scheme
    )
    assert torch.equal(dec["weight"], ql.weight)  # compressed-tensors' own decompressor: calibra's weight
    # smoothing is in the exported norms
    assert torch.equal(loaded.model.layers[0].input_layernorm.weight, qm.model.model.layers[0].input_layernorm.weight)
    ref = _logits(qm.model)
    assert _rel(_logits(loaded), ref) <= TOL
    from calibra.quant import activations

    activations.remove(qm.model)  # the comparison can fail: without its simulated inputs it is measurably off
    assert _rel(_logits(qm.model), ref) > TOL


def test_moe_experts_get_finite_recorded_scales(moe_folder):
    qm, rep = _q(moe_folder, scheme="w8a8-static")
    experts = [n for n in qm.layers if ".experts." in n]
    assert len(experts) == 2 * 4 * 2
    for n in experts:
        iq = qm.input_quant[n]
        assert iq.format == "int8" and torch.isfinite(iq.scale).all() and float(iq.scale) > 0
        assert (iq.tokens > 0) != (iq.fallback is not None)
    assert rep["activation_quant"]["not_simulated"] == []
    # an MoE block's norm also feeds the router: only q/k/v are smoothing groups
    assert set(rep["smoothquant"]["groups"]) == {f"model.layers.{i}.input_layernorm" for i in range(2)}
