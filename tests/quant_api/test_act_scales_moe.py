"""Every activation-quantized scheme on an MoE model whose router never picks some experts: those experts
still get finite, recorded input quantization -- a static scale with a recorded fallback (never NaN, inf or
0), or a dynamic one -- and the simulated model computes finite logits. Also the MSE observer end to end."""

from __future__ import annotations

import json

import pytest
import torch

from calibra.quant.act_mse import SHRINK_GRID
from tests.quant_api._schemes import logits as _logits
from tests.quant_api._schemes import quantize_quiet as _q
from tests.quant_api.conftest import make_folder

DEAD = (2, 3)  # experts no calibration token reaches


@pytest.fixture(scope="module")
def dead_expert_folder(tmp_path_factory):
    """A tiny Mixtral with top-1 routing and router rows v, -v, 0, 0 in every layer: the winner is expert 0
    or 1 (the positive one of +-v.x), so experts 2 and 3 never see a token."""
    from transformers import AutoModelForCausalLM

    folder = make_folder(tmp_path_factory.mktemp("dead-moe"), "mixtral")
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.num_experts_per_tok = 1
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            v = torch.randn(model.config.hidden_size, generator=g)
            layer.mlp.gate.weight.copy_(torch.stack([v, -v, torch.zeros_like(v), torch.zeros_like(v)]))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "scheme,kw",
    [
        ("fp8", {}),
        ("fp8", {"act_observer": "mse"}),
        ("fp8", {"act_observer": "percentile"}),
        ("fp8-dynamic", {}),
        ("w8a8", {}),
        ("w8a8-static", {}),
        ("w8a8-static", {"act_observer": "mse"}),
        ("nvfp4", {}),
        ("mxfp4", {}),
    ],
)
def test_unreached_experts_get_finite_recorded_scales(dead_expert_folder, scheme, kw):
    qm, rep = _q(dead_expert_folder, scheme=scheme, **kw)
    cov = rep.get("moe_coverage")  # (a data-free job runs no calibration pass and has none)
    assert (cov is None) is (scheme in ("fp8-dynamic", "mxfp4"))
    if cov is not None:  # the premise: the calibration pass saw experts 2 and 3 of every block get no token
        rows = [r for r in cov if r["expert"] in DEAD]
        assert len(rows) == 2 * len(DEAD) and all(r["tokens"] == 0 for r in rows)
    experts = [n for n in qm.layers if ".experts." in n]
    assert len(experts) == 2 * 4 * 2 and set(qm.input_quant) == set(qm.layers)
    dead = {n for n in experts if int(n.split(".experts.")[1].split(".")[0]) in DEAD}
    aq = rep["activation_quant"]
    assert aq["not_simulated"] == []
    for n in experts:
        iq = qm.input_quant[n]
        if iq.dynamic:  # nothing to calibrate: scales are computed from each token at run time
            assert iq.scale is None and iq.fallback is None
            continue
        assert torch.isfinite(iq.scale).all() and float(iq.scale) > 0
        if n in dead:
            assert iq.tokens == 0 and iq.fallback and "no calibration token reached this expert" in iq.fallback
        else:
            assert iq.tokens > 0 and iq.fallback is None
    if not qm.input_quant[experts[0]].dynamic:
        assert aq["fallbacks"] == sorted(dead)
        assert aq["modules"][sorted(dead)[0]]["fallback"]  # recorded in the report
    assert torch.isfinite(_logits(qm.model)).all()


@pytest.mark.parametrize("scheme", ["fp8", "w8a8-static"])
def test_mse_observer_end_to_end(llama_folder, tmp_path, scheme):
    from calibra.eval import _load_quantize_output

    qm, rep = _q(llama_folder, tmp_path / "q", scheme=scheme, act_observer="mse")
    aq = rep["activation_quant"]
    assert aq["observer"] == "mse" and aq["shrink_grid"] == list(SHRINK_GRID)
    assert all(iq.clip in SHRINK_GRID and iq.tokens > 0 for iq in qm.input_quant.values())
    man = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert {n: m["clip"] for n, m in man["activations"]["modules"].items()} == {
        n: iq.clip for n, iq in qm.input_quant.items()
    }
    from calibra.report import render_report

    assert "<th>clip</th>" in render_report(rep)  # the kept factor per module in report.html
    loaded, _ = _load_quantize_output(tmp_path / "q", "float32", None)
    assert torch.equal(_logits(loaded), _logits(qm.model))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(scheme="fp8-dynamic", act_observer="mse"), "chooses static scales"),
        (dict(scheme="mxfp4", act_observer="mse"), "per-group scales computed at run time"),
    ],
)
def test_mse_observer_needs_a_static_scheme(llama_folder, tmp_path, no_load, kw, match):
    with pytest.raises(ValueError, match=match):
        _q(llama_folder, tmp_path / "out", **kw)
