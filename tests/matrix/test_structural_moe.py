"""MoE blocks found by the structural adapter: transformers 5's standard fused experts of families without
an explicit adapter are quantized per expert, their statistics fed the tokens the family's own routing
sends them (read from the experts' call), with coverage and shrinkage; other expert layouts stay dense
with the reason; and the quantized model exports to compressed-tensors and GPTQ that transformers reloads
with calibra's logits (``tests/matrix/run_one.export_checks``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from calibra.calib.runner import LayerRunner  # noqa: E402
from calibra.models import get_adapter  # noqa: E402
from calibra.models.structural import StructuralAdapter  # noqa: E402
from tests.matrix.tiny_configs import EXPERTS, tiny_model  # noqa: E402

from .moe_checks import (  # noqa: E402
    assert_experts_quantized,
    assert_folder_rebuilds,
    assert_folder_streams_the_experts,
    assert_refused_then_dense_reloads,
)

# families with standard fused experts and no explicit adapter (shared experts: deepseek_v3, glm4_moe,
# qwen3_next, ernie4_5_moe; hybrids: qwen3_next, jamba)
FAMILIES = ("olmoe", "deepseek_v3", "glm4_moe", "phimoe", "qwen3_next", "minimax", "jamba", "ernie4_5_moe")


def _moe_layers(a):
    return [(i, layer, a.moe_blocks(layer)) for i, layer in enumerate(a.layers) if a.moe_blocks(layer)]


def _gptq_of_saved(model, tmp_path):
    """``(QuantizedModel, report)`` of GPTQ W4 per-channel on ``model`` saved as a folder (with a tokenizer)
    under ``tmp_path / "m"``, written to ``tmp_path / "q"``."""
    import calibra
    from calibra.data import CalibrationConfig
    from calibra.quant import GPTQConfig

    from .run_one import CAL, _tokenizer

    model.save_pretrained(tmp_path / "m")
    _tokenizer(model.config.vocab_size).save_pretrained(tmp_path / "m")
    return calibra.quantize(
        str(tmp_path / "m"),
        GPTQConfig(bits=4, group_size=-1),
        CalibrationConfig(**CAL),
        output=str(tmp_path / "q"),
        evaluate=False,
        progress=False,
        echo=None,
    )


@pytest.mark.parametrize("model_type", FAMILIES)
def test_fused_experts_are_discovered(model_type):
    model = tiny_model(model_type)
    a = get_adapter(model)
    assert isinstance(a, StructuralAdapter)
    found = _moe_layers(a)
    assert found, "no MoE block found"
    for _, layer, blocks in found:
        (b,) = blocks
        assert b.fused and b.routed_at_experts and b.hook_module is b.experts
        assert b.num_experts == EXPERTS and b.experts is layer.get_submodule(f"{b.name}.experts")
        lin = a.linear_modules(layer)
        assert not any(n.startswith(f"{b.name}.experts") for n in lin)  # observed per expert, not as Linears
        router = [n for n, m in layer.named_modules() if m is b.router]
        assert router and not any(n.startswith(router[0]) for n in lin)  # the router stays dense
        shared = [n for n in lin if n.startswith(f"{b.name}.shared_expert")]
        if hasattr(b.module, "shared_experts") or hasattr(b.module, "shared_expert"):
            assert shared, "shared experts are ordinary Linears of the block"


@pytest.mark.parametrize(("model_type", "why"), [("llama4_text", "called as (hidden_states)")])
def test_other_expert_layouts_stay_dense_with_reason(model_type, why):
    a = get_adapter(tiny_model(model_type))
    layer = a.layers[0]
    assert a.moe_blocks(layer) == []
    dense = a.dense_linears(layer)
    reasons = [r for n, r in dense.items() if n.endswith("experts")]
    assert reasons and why in reasons[0], dense


def test_statistics_follow_the_familys_own_routing():
    """DeepSeek-V3 routes by grouped top-k over sigmoid scores plus correction biases (not a softmax top-k):
    the per-expert token counts and Hessians must be those of the tokens its own router sends to each
    expert, padding excluded."""
    model = tiny_model("deepseek_v3")
    a = get_adapter(model)
    i, layer, (b,) = _moe_layers(a)[0]
    with torch.no_grad():  # biases that move the choice away from the plain top-k of the logits
        b.router.e_score_correction_bias.copy_(torch.linspace(-1.0, 1.0, b.num_experts))
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (3, 10))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:] = False
    seen = []
    h = b.module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask.long())
    h.remove()
    x = seen[0][mask]  # the block's real tokens
    _, _, index = b.router(x)
    plain_choice = torch.topk(torch.nn.functional.linear(x, b.router.weight), b.top_k).indices  # no groups, no biases
    assert not torch.equal(index.sort(-1).values, plain_choice.sort(-1).values)  # the test can tell them apart
    stats = LayerRunner(model, a, device="cpu", observers=("hessian",), progress=False).run(ids, mask)
    key = f"{a.layer_name(i)}.{b.name}"
    want = torch.bincount(index.reshape(-1), minlength=b.num_experts)
    assert torch.equal(stats.tensors[f"moe/tokens/{key}"], want)
    for e in range(b.num_experts):
        xe = x[(index == e).any(-1)].double()
        got = stats.tensors[f"hessian/sum/{key}.experts.{e}.gate_up_proj"].double()
        torch.testing.assert_close(got, xe.T @ xe, rtol=1e-4, atol=1e-4)
        assert stats.count("hessian", f"{key}.experts.{e}.gate_up_proj") == xe.shape[0]


@pytest.mark.parametrize("model_type", ["deepseek_v3", "phimoe"])
def test_quantize_export_reload_and_coverage(model_type, tmp_path):
    """calibrate -> GPTQ W4 -> calibra's folder, compressed-tensors and GPTQ exports reloaded by transformers
    with calibra's logits (run_one's checks), every expert quantized, and a coverage row per expert."""

    from .run_one import CAL, export_checks

    model = tiny_model(model_type)
    qm, report = _gptq_of_saved(model, tmp_path)
    a = get_adapter(qm.model)
    blocks = [(f"{a.layer_name(i)}.{bs[0].name}", bs[0]) for i, _, bs in _moe_layers(a)]
    for key, b in blocks:
        for e in range(b.num_experts):
            assert {f"{key}.experts.{e}.gate_up_proj", f"{key}.experts.{e}.down_proj"} <= set(qm.layers)
    rows = report["moe_coverage"]
    assert {(r["block"], r["expert"]) for r in rows} == {(k, e) for k, b in blocks for e in range(b.num_experts)}
    tokens = 2 * CAL["num_samples"] * CAL["sequence_length"]  # top-2 of every calibration token
    assert all(sum(r["tokens"] for r in rows if r["block"] == k) == tokens for k, _ in blocks)
    assert all(0 < r["lambda"] <= 1 for r in rows)
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, 12))
    held, what = export_checks(qm, tmp_path, ids)
    assert held and what.startswith("ok") and "MoE GPTQ reload" in what, what


def test_router_that_needs_its_block_counts_the_choices():
    """AFMoE's router takes its block's expert bias as an argument, so it cannot score tokens alone: the
    coverage's probability mass is then each chosen expert's 1/k share, and the counts still follow the
    experts' call."""
    model = tiny_model("afmoe")
    a = get_adapter(model)
    i, _, (b,) = _moe_layers(a)[0]
    ids = torch.randint(3, 300, (2, 8))
    stats = LayerRunner(model, a, device="cpu", observers=("hessian",), progress=False).run(ids)
    key = f"{a.layer_name(i)}.{b.name}"
    tokens, mass = stats.tensors[f"moe/tokens/{key}"], stats.tensors[f"moe/prob_mass/{key}"]
    assert int(tokens.sum()) == ids.numel() * b.top_k
    torch.testing.assert_close(mass, tokens.double() / b.top_k)


def test_llama4_experts_written_as_the_quantized_loader_expects(tmp_path):
    """transformers swaps Llama 4's fused experts for per-expert Linears (SequentialLlama4TextExperts) when it
    loads a compressed-tensors checkpoint: the export writes the dense experts as those Linears' weights,
    lists them in ``ignore``, and the compressed load (no fallback) gives calibra's logits."""
    import json

    from safetensors.torch import load_file

    import calibra
    from calibra.data import CalibrationConfig
    from calibra.quant import GPTQConfig

    from .run_one import CAL, _tokenizer, export_checks

    model = tiny_model("llama4_text")
    model.save_pretrained(tmp_path / "m")
    _tokenizer(model.config.vocab_size).save_pretrained(tmp_path / "m")
    qm, _ = calibra.quantize(
        str(tmp_path / "m"),
        GPTQConfig(bits=4, group_size=-1),
        CalibrationConfig(**CAL),
        output=str(tmp_path / "q"),
        evaluate=False,
        progress=False,
        echo=None,
    )
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (2, 12))
    held, what = export_checks(qm, tmp_path, ids)
    assert held and what.startswith("ok") and "decompressed" not in what, what
    tensors = {}
    for f in (tmp_path / "ct").glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    experts = qm.model.model.layers[0].feed_forward.experts
    p = "model.layers.0.feed_forward.experts"
    assert f"{p}.gate_up_proj" not in tensors and f"{p}.down_proj" not in tensors
    inter = experts.down_proj.shape[1]
    for e in range(experts.num_experts):  # [out, in] Linear weights of the fused [E, H, 2I] / [E, I, H] ones
        assert torch.equal(tensors[f"{p}.{e}.gate_proj.weight"], experts.gate_up_proj[e, :, :inter].T)
        assert torch.equal(tensors[f"{p}.{e}.up_proj.weight"], experts.gate_up_proj[e, :, inter:].T)
        assert torch.equal(tensors[f"{p}.{e}.down_proj.weight"], experts.down_proj[e].T)
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    projs = ("gate_proj", "up_proj", "down_proj")
    assert {f"{p}.{e}.{proj}" for e in range(experts.num_experts) for proj in projs} <= set(ignore)


def test_gpt_oss_experts_are_discovered_per_expert_with_their_own_gate():
    """GPT-OSS's experts ([E, H, 2I] applied as x @ W, interleaved gate/up columns, biases, a clamped gate)
    are an MoE block: each expert's weight is the transposed slice, gate and up are the even and odd
    columns, and the down projection's input is what the module itself computes (biases included)."""
    from calibra.compat.transformers import expert_down_input, expert_slice, fused_expert_weights
    from calibra.quant.apply import layer_targets

    model = tiny_model("gpt_oss")
    a = get_adapter(model)
    i, layer, (b,) = _moe_layers(a)[0]
    ex = b.experts
    assert b.routed_at_experts and b.num_experts == EXPERTS
    gate, up, down = fused_expert_weights(ex, 1)
    torch.testing.assert_close(gate, ex.gate_up_proj[1, :, 0::2].T)
    torch.testing.assert_close(up, ex.gate_up_proj[1, :, 1::2].T)
    assert expert_slice(ex, "gate_up_proj", 1).shape == (ex.gate_up_proj.shape[2], ex.gate_up_proj.shape[1])
    assert down.shape == (ex.down_proj.shape[2], ex.down_proj.shape[1])
    torch.manual_seed(0)
    x = torch.randn(5, ex.gate_up_proj.shape[1])
    with torch.no_grad():
        want = ex(x, torch.full((5, 1), 2), torch.ones(5, 1))  # every token to expert 2, weight 1
        got = expert_down_input(ex, 2, x) @ ex.down_proj[2] + ex.down_proj_bias[2]
    torch.testing.assert_close(got, want)
    names = {t.name for t in layer_targets(a, i, layer)}
    key = f"{a.layer_name(i)}.{b.name}.experts"
    assert {f"{key}.{e}.{p}" for e in range(EXPERTS) for p in ("gate_up_proj", "down_proj")} <= names
    assert not any("bias" in n for n in names)  # biases stay dense


def test_gpt_oss_experts_quantized_per_expert(tmp_path):
    """calibrate -> GPTQ W4 quantizes every GPT-OSS expert (the routed tokens' statistics, a coverage row per
    expert), writes the dequantized codes back transposed with the biases untouched, and calibra's folder
    rebuilds the same model; compressed-tensors refuses by name (the checkpoint keeps the experts fused)."""
    model = tiny_model("gpt_oss")
    qm, report = _gptq_of_saved(model, tmp_path)
    assert_experts_quantized(qm, report, model)  # read back through expert_slice's transposed view
    ex, orig = qm.model.model.layers[0].mlp.experts, model.model.layers[0].mlp.experts
    ql = qm.layers["model.layers.0.mlp.experts.1.down_proj"]
    assert torch.equal(ex.down_proj[1], ql.weight.T.to(ex.down_proj.dtype))  # stored transposed
    for bias in ("gate_up_proj_bias", "down_proj_bias"):
        assert torch.equal(getattr(ex, bias), getattr(orig, bias))
    ids = assert_folder_rebuilds(qm, tmp_path / "q")
    assert_folder_streams_the_experts(qm, tmp_path / "q")  # transposed back by the layer-by-layer reader
    assert_refused_then_dense_reloads(qm, tmp_path, ids, match="gate_up_proj whole")


def test_dbrx_experts_quantized_per_expert(tmp_path):
    """DBRX's experts (2-D ``w1`` / ``v1`` / ``w2`` ``[E*I, H]`` viewed per expert, ``w2`` applied transposed)
    are an MoE block: calibrate -> GPTQ W4 quantizes every expert from the tokens its router sends it (a
    coverage row per expert), writes the dequantized codes back into the expert's rows, calibra's folder
    rebuilds the same model, compressed-tensors / GPTQ refuse by name (the checkpoint stores the experts
    whole) and the dense export reloads in transformers with calibra's simulated logits."""
    from calibra.compat.transformers import expert_down_input, expert_slice

    model = tiny_model("dbrx")
    a = get_adapter(model)
    i, _, (b,) = _moe_layers(a)[0]
    ex = b.experts
    assert (
        b.routed_at_experts
        and b.num_experts == EXPERTS
        and a.dense_linears(a.layers[i]) == {f"{b.name}.router.layer": "MoE router"}
    )
    torch.manual_seed(0)
    x = torch.randn(5, model.config.d_model)
    with torch.no_grad():  # every token to expert 2, weight 1: the module's output from calibra's [out, in] slices
        want = ex(x, torch.full((5, 1), 2), torch.ones(5, 1)).reshape(5, -1)
        got = torch.nn.functional.linear(expert_down_input(ex, 2, x), expert_slice(ex, "down_proj", 2))
    torch.testing.assert_close(got, want)

    qm, report = _gptq_of_saved(model, tmp_path)
    blocks = assert_experts_quantized(qm, report, model)  # read back through expert_slice: w1/v1 rows, w2 transposed
    assert len(blocks) == qm.model.config.n_layers
    inter = qm.model.config.ffn_config.ffn_hidden_size
    for key, _ in blocks:  # the slices are the experts' own rows of the 2-D parameters
        mlp = qm.model.get_submodule(f"{key}.experts.mlp")
        for e in range(EXPERTS):
            rows = slice(e * inter, (e + 1) * inter)
            gu, down = qm.layers[f"{key}.experts.{e}.gate_up_proj"], qm.layers[f"{key}.experts.{e}.down_proj"]
            assert torch.equal(torch.cat([mlp.w1[rows], mlp.v1[rows]]), gu.weight.to(mlp.w1.dtype))
            assert torch.equal(mlp.w2[rows], down.weight.T.to(mlp.w2.dtype))  # stored transposed
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "q" / "quantized.safetensors"))
    assert not any(".experts.mlp." in k for k in stored)  # the experts as codes only, no dense copy beside them
    ids = assert_folder_rebuilds(qm, tmp_path / "q")
    assert_folder_streams_the_experts(qm, tmp_path / "q")  # w1 / v1 / w2 rows assembled by the streamed reader
    assert_refused_then_dense_reloads(qm, tmp_path, ids, match="export 'dense' only")


def test_jetmoe_experts_quantized_per_expert(tmp_path):
    """JetMoE's MoE block holds its experts itself (``input_linear [E, 2I, H]`` / ``output_linear [E, H, I]``,
    called with the tokens sorted by expert): calibrate -> GPTQ W4 quantizes every expert from the tokens the
    router's top-k sends it (a coverage row per expert), writes the codes back into the block's weights,
    calibra's folder rebuilds the same model, compressed-tensors / GPTQ refuse by name and the dense export
    reloads in transformers with calibra's logits. Its mixture-of-attention experts stay dense, with the reason."""
    model = tiny_model("jetmoe")
    a = get_adapter(model)
    i, layer, (b,) = _moe_layers(a)[0]
    assert b.experts is b.module is layer.mlp and not b.routed_at_experts and b.router is layer.mlp.router.layer
    assert "not fused" in a.dense_linears(layer)["self_attention.experts"]
    qm, report = _gptq_of_saved(model, tmp_path)
    blocks = assert_experts_quantized(qm, report, model)  # read back from the block's input/output_linear
    assert [k for k, _ in blocks] == [f"model.layers.{j}.mlp" for j in range(len(qm.model.model.layers))]
    ids = assert_folder_rebuilds(qm, tmp_path / "q")
    assert_refused_then_dense_reloads(qm, tmp_path, ids, match="export 'dense' only")
