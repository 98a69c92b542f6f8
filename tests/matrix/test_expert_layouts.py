"""Fused expert layouts beyond transformers 5's standard one, quantized per expert by the structural adapter
(``compat.transformers``): Aria's transposed gate/up (``transposed_glu_experts``), Nemotron-H's and Ergo's
experts without a gate (``ungated_experts``, Ergo's transposed, with a per-expert norm after the down
projection), MiniMax-M3's clamped gate of its own (``_apply_gate`` instead of an ``act_fn``). For each:
calibra's per-expert view computes what the family's experts module computes; calibrate -> GPTQ W4
quantizes every expert from the tokens its own router sends it (per-expert counts summing to tokens x
top-k, a coverage row per expert); calibra's folder rebuilds the same model; and the export reloads in
transformers with calibra's simulated logits -- per expert in compressed-tensors and GPTQ where the
checkpoint stores the experts per expert (Nemotron-H), else refused by name with ``dense`` reloading."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from calibra.models import get_adapter  # noqa: E402
from calibra.models.structural import StructuralAdapter  # noqa: E402
from tests.matrix.tiny_configs import EXPERTS, tiny_model  # noqa: E402

from .moe_checks import (  # noqa: E402
    assert_dense_reloads,
    assert_experts_quantized,
    assert_folder_rebuilds,
    assert_folder_streams_the_experts,
    assert_refused_then_dense_reloads,
    moe_blocks,
)

# model_type -> the compat layout predicate its experts satisfy
LAYOUTS = {
    "aria_text": "transposed_glu_experts",
    "ergo": "ungated_experts",
    "nemotron_h": "ungated_experts",
    "minimax_m3_vl_text": "is_fused_experts",
}
# families whose checkpoint stores the experts per expert (exported quantized); the others store them whole
PER_EXPERT_CHECKPOINT = ("nemotron_h",)


@pytest.mark.parametrize("model_type", sorted(LAYOUTS))
def test_per_expert_view_computes_what_the_family_computes(model_type):
    """Each expert's ``[out, in]`` slices and down-projection input (``compat.transformers``) reproduce the
    family's own experts module on tokens all routed to one expert; the experts are an MoE block (routers
    dense, shared experts ordinary Linears), none left dense."""
    import calibra.compat.transformers as compat

    model = tiny_model(model_type)
    a = get_adapter(model)
    assert isinstance(a, StructuralAdapter)
    blocks = moe_blocks(a)
    assert blocks
    for layer in a.layers:
        assert not any(r.startswith("MoE experts:") for r in a.dense_linears(layer).values())
    for key, b in blocks:
        ex = b.experts
        assert getattr(compat, LAYOUTS[model_type])(ex) and compat.standard_fused_experts_issue(ex) is None
        assert b.routed_at_experts and b.num_experts == EXPERTS
        layer = model.get_submodule(key.rpartition(".")[0])
        lin = a.linear_modules(layer)
        block = key.rpartition(".")[2]
        assert not any(n.startswith(f"{block}.experts") for n in lin)
        assert any(n.startswith(f"{block}.shared_experts.") for n in lin)
        torch.manual_seed(0)
        x = torch.randn(5, compat.expert_slice(ex, "gate_up_proj", 0).shape[1])
        with torch.no_grad():  # every token to expert 2 with weight 1
            want = ex(x, torch.full((5, 1), 2), torch.ones(5, 1))
            down_in = compat.expert_down_input(ex, 2, x)
            got = torch.nn.functional.linear(down_in, compat.expert_slice(ex, "down_proj", 2))
            norm = getattr(ex, "post_expert_norm", None)  # Ergo: each expert's own norm after its down projection
            if norm is not None:
                got = norm(got, torch.full((5,), 2))
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("model_type", sorted(LAYOUTS))
def test_experts_quantized_per_expert_and_exported(model_type, tmp_path):
    from .run_one import export_checks
    from .test_structural_moe import _gptq_of_saved

    model = tiny_model(model_type)
    qm, report = _gptq_of_saved(model, tmp_path)
    assert_experts_quantized(qm, report, model)
    ids = assert_folder_rebuilds(qm, tmp_path / "q")
    assert_folder_streams_the_experts(qm, tmp_path / "q")
    if model_type in PER_EXPERT_CHECKPOINT:
        held, what = export_checks(qm, tmp_path, ids)  # compressed-tensors and GPTQ, reloaded by transformers
        assert held and what.startswith("ok") and "MoE GPTQ reload" in what and "decompressed" not in what, what
        assert_dense_reloads(qm, tmp_path, ids)
    else:
        assert_refused_then_dense_reloads(qm, tmp_path, ids, match="whole")


def test_moe_coverage_lists_only_the_documented_dense_experts():
    """``tools/moe_coverage.py`` (the table of docs/moe_coverage.md): the layouts above and a standard one
    are quantized per expert in every MoE layer, and what stays dense (Llama 4's experts, JetMoE's attention
    experts) is a documented exception with its reason."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "moe_coverage.py"
    spec = importlib.util.spec_from_file_location("moe_coverage", path)
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # its dataclass looks its module up there
    spec.loader.exec_module(tool)
    rows = {t: tool.coverage(t) for t in (*sorted(LAYOUTS), "mixtral", "llama4_text", "jetmoe")}
    for t in (*LAYOUTS, "mixtral"):
        assert rows[t].blocks > 0 and rows[t].experts == EXPERTS and rows[t].dense == {}, rows[t]
    llama4 = rows["llama4_text"]
    assert llama4.blocks == 0 and "called as (hidden_states)" in llama4.dense["feed_forward.experts"]
    assert rows["jetmoe"].blocks == 2 and set(rows["jetmoe"].dense) == {"self_attention.experts"}
    assert all(not tool.unexpected(r) for r in rows.values())
    assert tool.coverage("llama") is None  # no experts: not an MoE row
    assert "| `nemotron_h` | 1 | 4 |  |" in tool.table(list(rows.values()))


def test_nemotron_h_streamed_quantize_is_refused_before_any_work(tmp_path):
    """Streamed quantization of Nemotron-H stays refused by name (its fused ``experts.up_proj`` is not read
    tensor by tensor; and its checkpoint renames ``backbone.`` -> ``model.``, whose persistent router buffers
    the streamed writer would not carry): the whole-model path quantizes it."""
    import calibra
    from calibra.data import CalibrationConfig
    from calibra.quant import RTNConfig

    from .run_one import CAL, _tokenizer

    model = tiny_model("nemotron_h")
    model.save_pretrained(tmp_path / "m")
    _tokenizer(model.config.vocab_size).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="cannot be streamed"):
        calibra.quantize(
            str(tmp_path / "m"),
            RTNConfig(bits=4, group_size=-1),
            CalibrationConfig(**CAL),
            output=tmp_path / "s",
            stream=True,
            evaluate=False,
            progress=False,
            echo=None,
        )
    assert not (tmp_path / "s").exists()
