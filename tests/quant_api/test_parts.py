"""The pieces behind calibra.quantize: true-sequential re-collection, activation ranges and smoothing,
mixed precision, and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import calibra
from calibra.calib import LayerRunner
from calibra.cli import main
from calibra.data import CalibrationConfig
from calibra.quant import GPTQConfig, RTNConfig
from calibra.quant import act_ranges as ar
from calibra.quant import mixed as mp

from .conftest import CAL_KW, EVAL_TOKENS


def _model(folder):
    from calibra.assets import load_model

    return load_model(str(folder))[0]


def test_recollect_equals_a_fresh_pass_on_the_modified_layer(llama_folder):
    """After q/k/v change inside on_layer, recollect gives o_proj the Hessian of the changed layer."""
    ids = torch.randint(1, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    model = _model(llama_folder)
    got = {}

    def on_layer(i, layer, stats):
        if i != 0:
            return
        with torch.no_grad():
            for n in ("q_proj", "k_proj", "v_proj"):
                w = getattr(layer.self_attn, n).weight
                w.mul_(1.5)
        got["before"] = stats.tensors["hessian/sum/model.layers.0.self_attn.o_proj"].clone()
        got["after"] = runner.recollect(i, layer).tensors["hessian/sum/model.layers.0.self_attn.o_proj"].clone()

    runner = LayerRunner(model, device="cpu", on_layer=on_layer, feed_compressed=True, progress=False)
    st = runner.run(ids)
    assert st.count("hessian", "model.layers.0.self_attn.o_proj") == 3 * 16  # replaced, not added twice
    fresh_model = _model(llama_folder)
    with torch.no_grad():
        for n in ("q_proj", "k_proj", "v_proj"):
            getattr(fresh_model.model.layers[0].self_attn, n).weight.mul_(1.5)
    fresh = LayerRunner(fresh_model, device="cpu", progress=False).run(ids)
    want = fresh.tensors["hessian/sum/model.layers.0.self_attn.o_proj"]
    assert not torch.allclose(got["before"], want, rtol=1e-3)
    torch.testing.assert_close(got["after"], want, rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="outside on_layer"):
        runner.recollect(0, model.model.layers[0])


def test_smoothing_keeps_the_float_model_and_roundtrips(llama_folder, tmp_path):
    model = _model(llama_folder)
    ids = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    from calibra.models import get_adapter

    adapter = get_adapter(model)
    stats = LayerRunner(model, adapter, device="cpu", observers=("ranges",), progress=False).run(ids)
    doc = ar.build(stats, model, adapter, percentile=99.0, alpha=0.5)
    assert set(doc["smooth_factor"]) == {
        f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    }
    r = doc["layer_ranges"]["model.layers.0.self_attn.q_proj"]
    assert r["min"] <= r["p_lo"] <= r["p_hi"] * (1 + 2 ** (1 / 16)) and r["p_hi"] <= r["max"] * (1 + 2 ** (1 / 16))
    # s_j = max|X_j|^a / max|W_j|^(1-a) over q/k/v jointly
    act = torch.maximum(
        stats.tensors["ranges/min/model.layers.0.self_attn.q_proj"].abs(),
        stats.tensors["ranges/max/model.layers.0.self_attn.q_proj"].abs(),
    )
    att = model.model.layers[0].self_attn
    wmax = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]).abs().amax(0)
    s = torch.tensor(doc["smooth_factor"]["model.layers.0.input_layernorm"]["scales"])
    torch.testing.assert_close(s, act.clamp_min(1e-5).sqrt() / wmax.clamp_min(1e-5).sqrt(), rtol=1e-5, atol=0)
    before = model(ids).logits.detach()
    smoothed = copy.deepcopy(model)
    ar.apply_smoothing(doc, smoothed)
    torch.testing.assert_close(smoothed(ids).logits.detach(), before, rtol=1e-4, atol=1e-4)

    # via the API: writes the file, and the file given back as calibration reproduces the result bytes
    cfg = RTNConfig(bits=4, group_size=32)
    out1, out2 = tmp_path / "a", tmp_path / "b"
    _, rep = calibra.quantize(
        str(llama_folder),
        cfg,
        CalibrationConfig(**CAL_KW),
        act_ranges=True,
        output=out1,
        evaluate=False,
        progress=False,
        echo=None,
    )
    assert rep["activation_ranges"]["source"] == "collected" and len(rep["activation_ranges"]["smoothed_modules"]) == 10
    calibra.quantize(
        str(llama_folder),
        cfg,
        str(out1 / "activation_ranges.json"),
        output=out2,
        evaluate=False,
        progress=False,
        echo=None,
    )
    assert (out1 / "quantized.safetensors").read_bytes() == (out2 / "quantized.safetensors").read_bytes()


def test_mixed_precision_promotes_most_sensitive_within_budget(llama_folder):
    cfg = GPTQConfig(bits=3, group_size=32)
    base = mp.bits_per_weight(cfg)
    assert base == 3 + 16 / 32
    qm, rep = calibra.quantize(
        str(llama_folder),
        cfg,
        CalibrationConfig(**CAL_KW),
        mixed_precision=base + 1.0,
        evaluate=False,
        progress=False,
        echo=None,
    )
    plan = rep["mixed_precision"]
    assert plan["promoted"] and plan["avg_bits_per_weight"] <= base + 1.0 + 1e-9
    for name, ql in qm.layers.items():
        assert ql.bits == (8 if name in plan["promoted"] else 3), name
    # the promoted set is the top of the sensitivity-per-weight order (greedy may skip one that does not fit)
    sens = plan["sensitivity"]
    sizes = {n: ql.codes.numel() for n, ql in qm.layers.items()}
    order = sorted(sens, key=lambda n: -sens[n] / sizes[n])
    assert order[0] in plan["promoted"]
    assert rep["summary"]["avg_bits_per_weight"] == pytest.approx(plan["avg_bits_per_weight"])


@pytest.mark.parametrize(
    "flags,method",
    [
        (["--method", "rtn", "--group-size", "32"], "rtn"),
        (["--method", "gptq", "--group-size", "32"], "gptq"),
        (["--method", "gptq", "--group-size", "32", "--desc-act", "--damp", "0.05"], "gptq"),
        (["--method", "mr-gptq", "--format", "mxfp4"], "mr_gptq"),
        (["--method", "mr-gptq", "--format", "nvfp4"], "mr_gptq"),
    ],
)
def test_cli_every_method(llama_folder, tmp_path, capsys, flags, method):
    out = tmp_path / "cli"
    rc = main(
        [
            "quantize",
            "--input",
            str(llama_folder),
            "--output",
            str(out),
            *flags,
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--seed",
            "3",
            "--eval",
            "--eval-max-tokens",
            str(EVAL_TOKENS),
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "KL(ref||quant)" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["settings"]["method"] == method and rep["seed"] == 3
    assert {"baseline", "compressed"} <= set(rep["eval"]["perplexity"]) and "mean" in rep["eval"]["kl_divergence"]
    assert len(rep["modules"]) == 14 and all(r["method"] == method for r in rep["modules"])
    if "--desc-act" in flags:
        assert rep["settings"]["config"]["desc_act"] is True and rep["settings"]["config"]["damp_percent"] == 0.05
    if "--format" in flags:
        assert rep["settings"]["config"]["format"] == flags[-1]


def test_cli_bad_group_size_writes_nothing(ragged_folder, tmp_path):
    out = tmp_path / "cli"
    with pytest.raises(ValueError, match="mxfp4 needs in_features divisible by its scale block 32"):
        main(
            [
                "quantize",
                "--input",
                str(ragged_folder),
                "--output",
                str(out),
                "--method",
                "gptq",
                "--format",
                "mxfp4",
                "--no-progress",
            ]
        )
    assert not out.exists()


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    for opt in (
        "--input",
        "--output",
        "--method",
        "--bits",
        "--group-size",
        "--format",
        "--calibration",
        "--samples",
        "--seq-len",
        "--desc-act",
        "--damp",
        "--seed",
        "--eval",
        "--overwrite",
        "--mixed-precision",
        "--act-ranges",
        "--stats",
    ):
        assert opt in text, opt
