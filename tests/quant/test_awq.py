"""AWQ (calibra.quant.awq): the fold leaves the model's function unchanged (float64, before quantization);
the scaled Hessian is the Hessian of the scaled inputs; the search never raises the group's H-weighted
output loss over no scaling (RTN, and GPTQ with the solver check); AWQ + RTN and AWQ + GPTQ quantize
builtin:tiny-llama and the compressed-tensors export reloads in transformers with the quantized logits;
what AWQ does not combine with is refused before any weight loads."""

from __future__ import annotations

import json

import pytest
import torch

import calibra
from calibra.data import CalibrationConfig
from calibra.models import get_adapter
from calibra.quant import GPTQConfig, RTNConfig, gptq_quantize, rtn_quantize
from calibra.quant.awq import awq_groups, fold, scaled_hessian, search
from calibra.quant.clip_search import output_error
from tests.quant._layers import layer


def _llama64(kv_heads: int):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
    )
    m = tf.LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:  # norms away from 1, so dividing them is visible
                p.copy_(torch.rand_like(p) + 0.5)
    return m


def test_fold_equals_unfolded_in_float64():
    model = _llama64(kv_heads=4)  # MHA: v_proj's outputs are o_proj's inputs, so the v -> o group exists
    adapter = get_adapter(model)
    x = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        before = model(x).logits
    g = torch.Generator().manual_seed(1)
    kinds = set()
    for i, lay in enumerate(adapter.layers):
        groups = awq_groups(adapter, i, lay)
        kinds |= {gr.name.split(f"layers.{i}.", 1)[1] for gr in groups}
        for gr in groups:
            n = next(iter(gr.consumers.values())).in_features
            fold(gr, torch.exp(torch.randn(n, generator=g, dtype=torch.float64)))  # factors in ~[0.05, 20]
    assert kinds == {
        "input_layernorm -> q_proj,k_proj,v_proj",
        "post_attention_layernorm -> gate_proj,up_proj",
        "self_attn.v_proj -> o_proj",
        "mlp.up_proj -> down_proj",
    }
    with torch.no_grad():
        after = model(x).logits
        changed = float(
            (adapter.layers[0].self_attn.o_proj.weight - _llama64(4).model.layers[0].self_attn.o_proj.weight)
            .abs()
            .max()
        )
    assert changed > 1e-2  # the weights were rescaled ...
    assert float((after - before).abs().max()) <= 1e-12 * max(1.0, float(before.abs().max()))  # ... the function not


def test_grouped_query_attention_has_no_v_to_o_group():
    model = _llama64(kv_heads=2)  # v_proj's 2 heads are repeated for o_proj's 4: no one-to-one fold
    adapter = get_adapter(model)
    names = [g.name for g in awq_groups(adapter, 0, adapter.layers[0])]
    assert len(names) == 3 and not any("v_proj ->" in n for n in names)


def test_scaled_hessian_is_the_hessian_of_the_scaled_inputs():
    _, _, _, x = layer(n=32, tokens=200)
    x = x.double()
    s = torch.exp(torch.randn(32, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    got = scaled_hessian(x.T @ x, s)
    want = (x / s).T @ (x / s)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-9)


GRIDS = [(4, 128, "int"), (3, 32, "int"), (4, -1, "int"), (4, 16, "nvfp4"), (4, 32, "mxfp4")]


@pytest.mark.parametrize("bits,gs,fmt", GRIDS, ids=["int4-g128", "int3-g32", "int4-channel", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_search_never_raises_the_rtn_loss(bits, gs, fmt, seed):
    w, h, n, _ = layer(out=64, n=128, seed=seed, outliers=True)
    cfg = RTNConfig(bits=bits, group_size=gs, format=fmt)
    r = search([w], [cfg], h, n)
    # alpha = 0's loss is plain RTN's measured relative output error
    assert r["loss_unscaled"] == pytest.approx(output_error(w, rtn_quantize(w, cfg).weight, h), rel=1e-5)
    assert r["loss"] <= r["loss_unscaled"]
    if fmt == "int" and gs == 128:  # outlier channels: the salient columns' scaling helps here
        assert r["alpha"] > 0 and r["loss"] < 0.9 * r["loss_unscaled"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_with_the_solver_check_never_raises_the_gptq_loss(seed):
    w, h, n, _ = layer(out=48, n=128, seed=seed, outliers=seed != 2)
    cfg = GPTQConfig(bits=3, group_size=32)
    r = search([w, 0.5 * w.flip(0)], [cfg, cfg], h, n, solver=True)
    assert r["solver_loss"] <= r["solver_loss_unscaled"]
    # alpha = 0 under the check is plain GPTQ on the unscaled Hessian
    ref = sum(float(((v.double() @ h.double()) * v.double()).sum()) for v in (w, 0.5 * w.flip(0)))
    plain = sum(
        output_error(v, gptq_quantize(v, h, n, cfg).weight, h) * float(((v.double() @ h.double()) * v.double()).sum())
        for v in (w, 0.5 * w.flip(0))
    )
    assert r["solver_loss_unscaled"] == pytest.approx(plain / ref, rel=1e-6)
    if r["alpha"] == 0.0:
        assert r["solver_loss"] == r["solver_loss_unscaled"]


@pytest.mark.parametrize("seed", [0, 1])
def test_solver_search_includes_alpha_zero_and_keeps_the_least_measured_gptq_loss(seed):
    """With margin 0 the kept alpha is the argmin of the measured GPTQ losses, alpha = 0 among them (plain
    GPTQ); with the default margin a scaled alpha is kept only where it clears the margin, else alpha = 0."""
    from calibra.quant.awq import SOLVER_MARGIN

    w, h, n, _ = layer(out=48, n=128, seed=seed, outliers=True)
    cfg = GPTQConfig(bits=3, group_size=32)
    ws = [w, 0.5 * w.flip(0)]
    r0 = search(ws, [cfg, cfg], h, n, solver=True, margin=0.0)
    losses = r0["solver_losses"]
    assert 0.0 in losses and len(losses) > 1
    assert r0["solver_loss"] == min(losses.values()) == losses[r0["alpha"]]
    assert r0["solver_loss_unscaled"] == losses[0.0]
    # the kept scales, solved again, give the recorded loss: what is recorded is what is folded
    from calibra.quant.awq import solver_loss

    ref = sum(float(((v.float() @ h.float()) * v.float()).double().sum()) for v in ws)
    assert solver_loss(ws, [cfg, cfg], h, n, r0["scales"]) / ref == pytest.approx(r0["solver_loss"], rel=1e-9)
    r = search(ws, [cfg, cfg], h, n, solver=True)
    assert r["solver_losses"] == losses
    if min(losses.values()) < (1 - SOLVER_MARGIN) * losses[0.0]:
        assert r["alpha"] == r0["alpha"]
    else:
        assert r["alpha"] == 0.0 and r["solver_loss"] == losses[0.0]
        assert bool((r["scales"] == 1).all())
    # a margin no gain can clear keeps plain GPTQ
    r1 = search(ws, [cfg, cfg], h, n, solver=True, margin=1.0)
    assert r1["alpha"] == 0.0 and r1["solver_loss"] == losses[0.0]


CAL = dict(num_samples=4, sequence_length=64, seed=0, batch_size=4)


@pytest.mark.parametrize(
    "cfg",
    [RTNConfig(bits=4, group_size=128, awq=True), GPTQConfig(bits=4, group_size=128, awq=True)],
    ids=["awq-rtn", "awq-gptq"],
)
def test_awq_quantize_tiny_llama_and_export_compressed_tensors(tmp_path, cfg):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from calibra.assets import load_model

    orig, _ = load_model("builtin:tiny-llama")
    out = tmp_path / "ct"
    qm, rep = calibra.quantize(
        "builtin:tiny-llama",
        cfg,
        CalibrationConfig(**CAL),
        output=out,
        export="compressed-tensors",
        evaluate=False,
        progress=False,
        echo=None,
    )
    groups = rep["awq"]["groups"]
    assert len(groups) == 4 * 3  # per layer: q/k/v, gate/up, up -> down (GQA: no v -> o)
    for g in groups:
        assert 0.0 <= g["alpha"] < 1.0 and g["loss"] <= g["loss_unscaled"]
        if "solver_loss" in g:
            assert g["solver_loss"] <= g["solver_loss_unscaled"]
    assert any(g["alpha"] > 0 for g in groups)
    # the scales are folded: some norm differs from the original model's, and the report says AWQ ran
    norm = "model.layers.{}.input_layernorm.weight"
    mine, theirs = qm.model.state_dict(), orig.state_dict()
    moved = [float((mine[norm.format(i)].float() - theirs[norm.format(i)].float()).abs().max()) for i in range(4)]
    assert max(moved) > 1e-3, moved
    assert json.loads((out / "report.json").read_text())["awq"]["grid"] == 20
    # an ordinary compressed-tensors checkpoint: transformers loads it and computes the quantized logits
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = qm.model(x).logits
        diff = float((loaded(x).logits - ref).abs().max())
        dense = float((orig.float()(x).logits - ref).abs().max())
    assert diff <= 1e-3 and dense > 100 * 1e-3, (diff, dense)


def test_refusals_before_loading():
    with pytest.raises(ValueError, match="awq_grid"):
        RTNConfig(awq=True, awq_grid=0).validate()
    with pytest.raises(ValueError, match="awq must be a bool"):
        GPTQConfig(awq=1).validate()
    with pytest.raises(ValueError, match="not implemented for fp8"):
        RTNConfig(bits=8, group_size=-1, format="fp8", awq=True).validate()
    with pytest.raises(ValueError, match="--awq and --act-ranges"):
        calibra.quantize("builtin:tiny-llama", RTNConfig(awq=True), act_ranges=True, progress=False, echo=None)
    with pytest.raises(ValueError, match="--resume with AWQ"):
        calibra.quantize(
            "builtin:tiny-llama", GPTQConfig(awq=True), output="/nonexistent/x", resume=True, progress=False, echo=None
        )


def test_cli_awq_flag():
    from calibra.cli import _quant_config, build_parser

    def cfg(*flags):
        args = build_parser().parse_args(["quantize", "--input", "x", "--output", "y", *flags])
        return _quant_config(args)

    assert cfg("--method", "rtn", "--awq").awq is True and isinstance(cfg("--method", "rtn", "--awq"), RTNConfig)
    assert cfg("--method", "gptq", "--awq").awq is True
    assert cfg("--method", "gptq").awq is False
    with pytest.raises(ValueError, match="not mr-gptq"):
        cfg("--method", "mr-gptq", "--format", "nvfp4", "--awq")
