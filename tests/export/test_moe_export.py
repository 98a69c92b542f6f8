"""Quantized MoE exports: fused experts written per expert under the original checkpoint's names.

* compressed-tensors, symmetric int: transformers 5.25 + compressed-tensors 0.20 load the export with
  ``AutoModelForCausalLM.from_pretrained`` (re-fusing the experts through its conversion mapping) and the
  logits equal calibra's simulated quantized model within 1e-3 (as test_compressed_tensors_client.py
  for dense models).
* compressed-tensors, asymmetric int and NVFP4: transformers 5.25 cannot load these experts on the CPU
  (its ``CompressedTensorsDequantize`` rebuilds each expert from ``weight_packed``/``weight_scale``/
  ``weight_shape`` only: an asymmetric expert fails on its missing zero point, an NVFP4 expert loads
  without its global scale, i.e. wrong). compressed-tensors' own code decompresses them instead: a
  skeleton of the checkpoint's per-expert Linears goes through ``apply_quantization_config``,
  ``ModelCompressor.compress_model``, the checkpoint's tensors and ``decompress_model``, and every weight
  equals calibra's dequantized slice exactly -- with the ``ignore`` list (routers, lm_head) honoured.
* GPTQ: transformers' GPTQ path (optimum + gptqmodel, not installed here) replaces ``nn.Linear`` modules
  only and has no expert conversion, so a reader unpacks qweight/qzeros/scales/g_idx with the format's
  formulas and compares with calibra's codes exactly (float16 scales being GPTQ's one rounding).

Three MoE families, fused in memory as transformers 5 holds them: Mixtral (``block_sparse_moe.experts.
<e>.w1/w3/w2``), Qwen2-MoE (shared expert, ``mlp.experts.<e>.gate_proj/up_proj/down_proj``), Qwen3-MoE.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import calibra.export as E
from calibra.quant import GPTQConfig, RTNConfig
from tests.export import _gptq as G
from tests.export import _moe as M
from tests.export import _qmodel as Q

pytest.importorskip("compressed_tensors")


def _transformers_version():
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__)


# The client side: transformers' compressed-tensors loader puts per-expert quantized weights into its fused
# expert modules in the version the suite is written against (5.25, tested); transformers 5.6 (the floor
# lane's) leaves them out and initializes the experts anew, and saves GraniteMoE's experts per expert.
# Versions in between are untested. The files themselves are checked on every version by the layout,
# decompression and GPTQ tests below.
needs_moe_ct_loader = pytest.mark.skipif(
    _transformers_version().release < (5, 25),
    reason="transformers < 5.25 does not load quantized compressed-tensors experts (5.6 initializes them anew)",
)
TOL = 1e-3
# the per-expert names of each family's original checkpoints: (block, gate, up, down)
NAMES = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


# more families transformers 5.25 fuses the same way, without an explicit adapter: the structural adapter
# lists their experts (tests/matrix/test_structural_moe.py runs them through calibra.quantize as well)
MORE_FAMILIES = ("olmoe", "deepseek_v3", "glm4_moe", "phimoe", "qwen3_next", "minimax", "jamba")


@pytest.fixture(scope="module")
def tok():
    return Q.tokenizer()


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _expected_slices(qm, family):
    """``{on-disk module: dequantized weight}`` for every quantized expert, from calibra's fused-slice
    layers and the family's checkpoint names (gate rows first, then up: transformers' fused layout)."""
    block, gate, up, down = NAMES[family]
    out = {}
    for name, l in qm.layers.items():
        if ".experts." not in name:
            continue
        layer_prefix, rest = name.split(".mlp.experts.")
        e, proj = rest.split(".")
        base = f"{layer_prefix}.{block}.experts.{e}"
        w = l.dequantize()
        if proj == "gate_up_proj":
            half = w.shape[0] // 2
            out[f"{base}.{gate}"], out[f"{base}.{up}"] = w[:half], w[half:]
        else:
            out[f"{base}.{down}"] = w
    return out


@pytest.mark.parametrize("family", M.FAMILIES)
@pytest.mark.parametrize(
    "cfg",
    [
        RTNConfig(bits=4, group_size=32, sym=True),
        RTNConfig(bits=8, group_size=-1, sym=True),
        RTNConfig(bits=3, group_size=32, sym=True),
        GPTQConfig(bits=4, group_size=32),
    ],
    ids=["int4-g32", "int8-channel", "int3-g32", "gptq-int4-g32"],
)
@needs_moe_ct_loader
def test_ct_moe_loads_in_transformers_and_matches(tmp_path, tok, family, cfg):
    from transformers import AutoModelForCausalLM

    model = M.tiny_moe(family)
    x = Q.ids()
    dense_logits = Q.logits(model, x)
    qm = M.quantize(model, tok, cfg, source=f"test:{family}")
    assert sum(".experts." in n for n in qm.layers) == 2 * 4 * 2  # 2 layers x 4 experts x (gate_up, down)
    p = E.export(qm, tmp_path / "ct", "compressed-tensors")[0]
    t = _tensors(p)
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in t)  # nothing fused on disk
    for name in _expected_slices(qm, family):
        assert f"{name}.weight_packed" in t and f"{name}.weight" not in t
    loaded = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    ref = Q.logits(qm.model, x)
    diff = float((Q.logits(loaded, x) - ref).abs().max())
    assert diff <= TOL, diff
    # quantization itself moved the logits by far more: the export is not the unquantized model
    assert float((ref - dense_logits).abs().max()) > 100 * diff


@pytest.mark.parametrize("family", MORE_FAMILIES)
@needs_moe_ct_loader
def test_ct_moe_more_families_load_in_transformers(tmp_path, tok, family):
    from transformers import AutoModelForCausalLM

    model = M.tiny_moe(family)
    x = Q.ids()
    dense_logits = Q.logits(model, x)
    qm = M.quantize(model, tok, RTNConfig(bits=4, group_size=16, sym=True), source=f"test:{family}")
    assert any(".experts." in n for n in qm.layers)
    p = E.export(qm, tmp_path / "ct", "compressed-tensors")[0]
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in _tensors(p))
    ref = Q.logits(qm.model, x)
    diff = float((Q.logits(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32), x) - ref).abs().max())
    assert diff <= TOL, diff
    assert float((ref - dense_logits).abs().max()) > 100 * diff


def _ct_skeleton_decompress(folder) -> dict[str, torch.Tensor]:
    """compressed-tensors' own decompression of ``folder``: one ``nn.Linear`` per quantized module and
    per ``ignore`` entry, under the checkpoint's names (the per-expert layout an engine builds),
    quantized by ``apply_quantization_config`` from config.json, compressed, filled with the
    checkpoint's tensors (strictly: a name or shape mismatch fails) and decompressed."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers.utils.quantization_config import CompressedTensorsConfig

    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    t = _tensors(folder)
    shapes = {}
    for k, v in t.items():
        if k.endswith(".weight_shape"):
            shapes[k[: -len(".weight_shape")]] = tuple(v.tolist())
        elif k.endswith(".weight_packed") and qc["format"] == "nvfp4-pack-quantized":
            shapes[k[: -len(".weight_packed")]] = (v.shape[0], 2 * v.shape[1])
    for name in qc["ignore"]:
        assert f"{name}.weight" in t, f"ignore lists {name}, which the checkpoint does not hold dense"
        shapes[name] = tuple(t[f"{name}.weight"].shape)
    root = torch.nn.Module()
    for name, (out, n) in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(n, out, bias=False))
    apply_quantization_config(root, QuantizationConfig.model_validate(qc), run_compressed=False)
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig(**qc))
    compressor.compress_model(root)
    sd = root.state_dict()
    root.load_state_dict({k: t[k] for k in sd}, strict=True)
    compressor.decompress_model(root)
    return {name: root.get_submodule(name).weight.detach() for name in shapes}


@pytest.mark.parametrize("family", M.FAMILIES)
@pytest.mark.parametrize(
    "cfg,dtype",
    [
        (RTNConfig(bits=4, group_size=32, sym=False), torch.float32),
        (RTNConfig(bits=4, group_size=16, format="nvfp4"), torch.bfloat16),
    ],
    ids=["int4-asym-g32", "nvfp4"],
)
def test_ct_moe_decompressed_by_compressed_tensors(tmp_path, tok, family, cfg, dtype):
    qm = M.quantize(M.tiny_moe(family, dtype=dtype), tok, cfg, source=f"test:{family}")
    p = E.export(qm, tmp_path / "ct", "compressed-tensors")[0]
    qc = json.loads((p / "config.json").read_text())["quantization_config"]
    block = NAMES[family][0]
    routers = [f"model.layers.{i}.{block}.gate" for i in range(2)]
    assert set(routers) <= set(qc["ignore"]) and "lm_head" in qc["ignore"]
    got = _ct_skeleton_decompress(p)
    want = _expected_slices(qm, family)
    assert set(want) <= set(got)
    for name, w in want.items():
        torch.testing.assert_close(got[name].to(w.dtype), w, rtol=0, atol=0, msg=name)
    for name, l in qm.layers.items():  # the attention (and shared-expert) Linears as they are
        if ".experts." not in name:
            torch.testing.assert_close(got[name].to(l.weight.dtype), l.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("family", M.FAMILIES)
@pytest.mark.parametrize(
    "cfg,v1",
    [
        (RTNConfig(bits=4, group_size=32, sym=True), True),
        (RTNConfig(bits=4, group_size=32, sym=False), False),
        (GPTQConfig(bits=4, group_size=32, sym=True, desc_act=True), True),
    ],
    ids=["v1-sym-int4-g32", "v2-asym-int4-g32", "v1-actorder-g32"],
)
def test_gptq_moe_layout(tmp_path, tok, family, cfg, v1):
    qm = M.quantize(M.tiny_moe(family), tok, cfg, source=f"test:{family}")
    p = E.export(qm, tmp_path / "gptq", "gptq")[0]
    qc = json.loads((p / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == ("gptq" if v1 else "gptq_v2")
    t = _tensors(p)
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in t)
    rounded = {n: dataclasses.replace(l, scales=l.scales.half().float()) for n, l in qm.layers.items()}
    want = _expected_slices(dataclasses.replace(qm, layers=rounded), family)
    for name, w in want.items():
        assert f"{name}.weight" not in t
        torch.testing.assert_close(G.gptq_dequant(t, name, cfg.bits, v1), w.float(), rtol=0, atol=0, msg=name)
    for name, l in qm.layers.items():
        if ".experts." not in name:
            torch.testing.assert_close(G.gptq_dequant(t, name, cfg.bits, v1), G.half_scales(l), rtol=0, atol=0)
    # the routers stay dense, under the checkpoint's names
    assert all(f"model.layers.{i}.{NAMES[family][0]}.gate.weight" in t for i in range(2))


# deepseek_v3's tiny MLA projections are 48 wide, which GPTQ's 32-multiple rule refuses
@pytest.mark.parametrize("family", M.FAMILIES + tuple(f for f in MORE_FAMILIES if f != "deepseek_v3"))
def test_gptq_moe_dequantized_loads_in_transformers(tmp_path, tok, family):
    """transformers re-fuses the GPTQ export's per-expert weights (dequantized by the reader) through its
    own conversion mapping: the names are the checkpoint's, and the logits are calibra's (fp16 scales)."""
    from transformers import AutoModelForCausalLM

    qm = M.quantize(M.tiny_moe(family), tok, RTNConfig(bits=4, group_size=32, sym=False), source=f"test:{family}")
    p = E.export(qm, tmp_path / "gptq", "gptq")[0]
    loaded = AutoModelForCausalLM.from_pretrained(G.gptq_as_dense(p, tmp_path / "dense", 4, False), dtype=torch.float32)
    x = Q.ids()
    diff = float((Q.logits(loaded, x) - Q.logits(G.with_half_scales(qm), x)).abs().max())
    assert diff <= TOL, diff


def test_dense_experts_are_listed_in_ignore(tmp_path, tok):
    """Attention quantized, fused experts left dense: each expert is written dense under its checkpoint
    name and listed in ``ignore`` (as the routers are), so a per-expert loader keeps it dense."""
    qm = M.quantize(M.tiny_moe("qwen3_moe"), tok, RTNConfig(bits=4, group_size=32), source="t", experts=False)
    p = E.export(qm, tmp_path / "ct", "compressed-tensors")[0]
    ignore = json.loads((p / "config.json").read_text())["quantization_config"]["ignore"]
    per_expert = [
        f"model.layers.{i}.mlp.experts.{e}.{n}" for i in range(2) for e in range(4) for n in NAMES["qwen3_moe"][1:]
    ]
    assert set(per_expert) <= set(ignore)
    got = _ct_skeleton_decompress(p)
    for name, l in qm.layers.items():
        torch.testing.assert_close(got[name], l.dequantize(), rtol=0, atol=0)
    fused = qm.model.model.layers[0].mlp.experts.gate_up_proj[1]
    assert torch.equal(got["model.layers.0.mlp.experts.1.up_proj"], fused[fused.shape[0] // 2 :])


@pytest.mark.parametrize("family", ["gpt_oss", "granitemoe"])
@needs_moe_ct_loader
def test_experts_saved_fused_stay_dense_or_are_refused(tmp_path, tok, family):
    """gpt-oss and GraniteMoE checkpoints store their experts fused (transposed/interleaved, or as one
    3-D ``input_linear``): with the attention quantized and the experts dense, the compressed-tensors export
    loads in transformers with calibra's logits; quantized experts there are refused, naming the layout."""
    from transformers import AutoModelForCausalLM

    cfg = RTNConfig(bits=4, group_size=16)
    qm = M.quantize(M.tiny_moe(family), tok, cfg, source=f"test:{family}", experts=False)
    p = E.export(qm, tmp_path / "ct", "compressed-tensors")[0]
    x = Q.ids()
    diff = float(
        (Q.logits(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32), x) - Q.logits(qm.model, x)).abs().max()
    )
    assert diff <= TOL, diff
    qm = M.quantize(M.tiny_moe(family), tok, cfg, source=f"test:{family}")
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(E.ExportError, match="whole, as|not a run of rows of one expert"):
            E.export(qm, tmp_path / fmt, fmt)


def test_partly_quantized_fused_experts_are_refused(tmp_path, tok):
    model = M.tiny_moe("mixtral")
    qm = M.quantize(model, tok, RTNConfig(bits=4, group_size=32), source="test:mixtral")
    qm.layers.pop("model.layers.0.mlp.experts.2.down_proj")
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(E.ExportError, match=r"3 of 4 experts are quantized \(expert 2 is not\)"):
            E.export(qm, tmp_path / fmt, fmt)
    assert E.export(qm, tmp_path / "dense", "dense")  # dense stays available


@pytest.mark.parametrize("fmt", ["mlx", "gguf-q4_0"])
def test_formats_without_experts_still_refuse(tmp_path, tok, fmt):
    qm = M.quantize(M.tiny_moe("qwen3_moe"), tok, RTNConfig(bits=4, group_size=32), source="test:qwen3_moe")
    with pytest.raises(E.ExportError, match="fused MoE expert weights"):
        E.export(qm, tmp_path / "o", fmt)


@needs_moe_ct_loader
def test_builtin_tiny_moe_quantize_exports_both(tmp_path):
    """The whole pipeline on builtin:tiny-moe (Mixtral, 8 experts): calibrate -> GPTQ W4 g32 -> export
    compressed-tensors and GPTQ in one run; transformers loads the first with calibra's logits, the second
    holds every expert under Mixtral's names with calibra's codes."""
    import calibra
    from calibra.data import CalibrationConfig

    qm, _ = calibra.quantize(
        "builtin:tiny-moe",
        GPTQConfig(bits=4, group_size=32),
        CalibrationConfig(num_samples=2, sequence_length=32),
        output=str(tmp_path / "q"),
        export="compressed-tensors,gptq",
        evaluate=False,
        progress=False,
        echo=None,
    )
    from transformers import AutoModelForCausalLM

    n_layers, n_exp = qm.model.config.num_hidden_layers, qm.model.config.num_local_experts
    assert sum(".experts." in n for n in qm.layers) == n_layers * n_exp * 2
    x = torch.randint(3, qm.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q" / "compressed-tensors", dtype=torch.float32)
    diff = float((Q.logits(loaded, x) - Q.logits(qm.model, x)).abs().max())
    assert diff <= TOL, diff
    t = _tensors(tmp_path / "q" / "gptq")
    rounded = {n: dataclasses.replace(l, scales=l.scales.half().float()) for n, l in qm.layers.items()}
    want = _expected_slices(dataclasses.replace(qm, layers=rounded), "mixtral")
    assert len(want) == n_layers * n_exp * 3
    for name, w in want.items():
        torch.testing.assert_close(G.gptq_dequant(t, name, 4, True), w.float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "cfg",
    [RTNConfig(bits=4, group_size=32, sym=False), RTNConfig(bits=4, group_size=16, format="nvfp4")],
    ids=["int4-asym-g32", "nvfp4"],
)
def test_moe_ct_export_evaluates_layer_by_layer(tmp_path, cfg, capsys):
    """The exports transformers cannot load (asymmetric, NVFP4 experts) are evaluated by calibra's own
    layer-by-layer reader -- its default for them -- which re-fuses the per-expert tensors at transformers'
    rows: the perplexity of calibra's simulated model."""
    import calibra

    protocol = dict(max_tokens=512, seq_len=128, progress=False)
    qm, _ = calibra.quantize(
        "builtin:tiny-moe", cfg, output=str(tmp_path / "q"), export="compressed-tensors", evaluate=False,
        progress=False, echo=None,
    )  # fmt: skip
    layered = calibra.evaluate(str(tmp_path / "q"), **protocol)  # stream=None: layer by layer for these
    assert "evaluating it layer by layer" in capsys.readouterr().err
    simulated = calibra.evaluate(qm.model, tokenizer=qm.tokenizer, **protocol)
    assert layered.tokens == simulated.tokens
    assert abs(layered.ppl - simulated.ppl) <= 1e-5 * simulated.ppl, (layered.ppl, simulated.ppl)
    unquantized = calibra.evaluate("builtin:tiny-moe", **protocol)
    assert abs(unquantized.ppl - simulated.ppl) > 1e-3 * simulated.ppl  # the check can fail
