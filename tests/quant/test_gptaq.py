"""GPTAQ (calibra.quant.gptaq): with identical quantized and full-precision inputs (C = 0) it is GPTQ bit for
bit under every option; with different inputs it lowers the asymmetric objective ||Q X~ - W X||^2 against
GPTQ and lands where the paper's column-by-column update does; through the runner, the layer-0 q/k/v (whose
two input streams are identical) equal GPTQ's and later modules differ; what it does not combine with is
refused before any weight loads."""

from __future__ import annotations

import pytest
import torch

import calibra
from calibra.data import CalibrationConfig
from calibra.quant import GPTQConfig, gptq_quantize

CAL = dict(num_samples=4, sequence_length=64, seed=0)

OPTIONS = [
    dict(),
    dict(sym=False),
    dict(desc_act=True),
    dict(desc_act=True, static_groups=True, group_size=64),
    dict(group_size=-1, bits=3),
    dict(format="mxfp4", group_size=32),
    dict(mse_clip=True, clip_metric="output"),
]


def _inputs(seed=0, n=512, d=256, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 3] *= 20  # an outlier channel
    x[:, 7] = 0  # a dead channel
    w = torch.randn(96, d, generator=g) * 0.05
    x_q = x + noise * torch.randn(n, d, generator=g)  # the quantized model's inputs
    x_q[:, 7] = 0
    return w, x, x_q


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_identical_inputs_equal_gptq_bit_for_bit(opts):
    w, x, _ = _inputs()
    h = x.T @ x
    plain = gptq_quantize(w, h, x.shape[0], GPTQConfig(**opts))
    cross = (x - x).T @ x  # identical streams: exactly zero
    asym = gptq_quantize(w, h, x.shape[0], GPTQConfig(**opts, gptaq=True), cross=cross)
    for field in ("codes", "scales", "zeros", "g_idx", "weight"):
        a, b = getattr(plain, field), getattr(asym, field)
        assert (a is None and b is None) or torch.equal(a, b), field


def _paper_gptaq(w, h, c, n, alpha, gs=128, bits=4):
    """The paper's update, column by column (no lazy batch), symmetric int grid fitted per group on the
    current columns as GPTQ does: the current column times P's row is added to the later columns."""
    hn, cn = h * 2 / n, c * 2 / n
    wk = w.clone().double()
    d = wk.shape[1]
    hn = hn.double() + 0.01 * hn.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hn)), upper=True)
    p = alpha * (cn.double() @ u.T).triu(1) @ u
    q = torch.zeros_like(wk)
    maxq = 2**bits - 1
    for i in range(d):
        if i % gs == 0:
            grp = wk[:, i : i + gs]
            amax = torch.maximum(grp.min(1).values.clamp(max=0).abs(), grp.max(1).values.clamp(min=0))
            s = 2 * amax / maxq
            s[s == 0] = 1
            z = (maxq + 1) / 2
        col = wk[:, i].clone()
        q[:, i] = (torch.clamp(torch.round(col / s) + z, 0, maxq) - z) * s
        err = (col - q[:, i]) / u[i, i]
        wk[:, i:] -= err[:, None] * u[i, i:][None] - col[:, None] * p[i, i:][None]
    return q.float()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.25, 1.0])
def test_lowers_the_asymmetric_objective_like_the_paper(seed, alpha):
    w, x, x_q = _inputs(seed)
    n = x.shape[0]
    h, c = x_q.T @ x_q, (x - x_q).T @ x_q
    target = x @ w.T  # the full-precision model's output

    def err(q):
        return float(((x_q @ q.T - target) ** 2).sum())

    gptq = gptq_quantize(w, h, n, GPTQConfig())
    ours = gptq_quantize(w, h, n, GPTQConfig(gptaq=True, gptaq_alpha=alpha), cross=c)
    paper = _paper_gptaq(w, h, c, n, alpha)
    assert err(ours.weight) < 0.95 * err(gptq.weight)
    # the correction by the full-precision weight (calibra) vs by the current column (the paper): a
    # second-order difference
    assert err(ours.weight) == pytest.approx(err(paper), rel=0.02)


def test_needs_the_cross_statistic_and_only_with_gptaq():
    w, x, _ = _inputs()
    h = x.T @ x
    with pytest.raises(ValueError, match="needs the cross statistic"):
        gptq_quantize(w, h, x.shape[0], GPTQConfig(gptaq=True))
    with pytest.raises(ValueError, match="gptaq=False"):
        gptq_quantize(w, h, x.shape[0], GPTQConfig(), cross=torch.zeros(256, 256))
    with pytest.raises(ValueError, match=r"must be \[256, 256\]"):
        gptq_quantize(w, h, x.shape[0], GPTQConfig(gptaq=True), cross=torch.zeros(255, 256))


def test_runner_pairs_the_streams_on_tiny_llama():
    """Layer 0's q/k/v read the embeddings' normed output in both streams, so their C is exactly zero and
    they equal GPTQ's bit for bit; every later module sees the accumulated error and differs."""
    runs = {}
    for on in (False, True):
        qm, rep = calibra.quantize(
            "builtin:tiny-llama",
            GPTQConfig(gptaq=on),
            CalibrationConfig(**CAL),
            evaluate=False,
            progress=False,
            echo=None,
        )
        runs[on] = (qm, rep)
    plain, asym = runs[False][0].layers, runs[True][0].layers
    assert plain.keys() == asym.keys()
    first = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    for name in first:
        assert torch.equal(plain[name].codes, asym[name].codes), name
        assert torch.equal(plain[name].scales, asym[name].scales), name
    later = [n for n in plain if n not in first]
    changed = [n for n in later if not torch.equal(plain[n].codes, asym[n].codes)]
    assert len(changed) == len(later), sorted(set(later) - set(changed))
    assert runs[True][1]["gptaq"] == {"alpha": 0.25, "corrected_modules": len(plain), "plain_gptq_experts": 0}


def test_refusals_before_loading(tmp_path):
    with pytest.raises(ValueError, match="gptaq must be a bool"):
        GPTQConfig(gptaq=1).validate()
    with pytest.raises(ValueError, match="gptaq_alpha"):
        GPTQConfig(gptaq=True, gptaq_alpha=0.0).validate()
    with pytest.raises(ValueError, match="gptaq and awq"):
        GPTQConfig(gptaq=True, awq=True).validate()
    with pytest.raises(ValueError, match="--resume with GPTAQ"):
        calibra.quantize(
            "builtin:tiny-llama",
            GPTQConfig(gptaq=True),
            output="/nonexistent/x",
            resume=True,
            progress=False,
            echo=None,
        )
    with pytest.raises(ValueError, match="drop --gptaq"):
        calibra.quantize(
            "builtin:tiny-llama", GPTQConfig(gptaq=True), output=tmp_path / "o", stream=True, progress=False, echo=None
        )


def test_cli_gptaq_flag():
    from calibra.cli import _quant_config, build_parser

    def cfg(*flags):
        args = build_parser().parse_args(["quantize", "--input", "x", "--output", "y", *flags])
        return _quant_config(args)

    assert cfg("--method", "gptq", "--gptaq").gptaq is True
    assert cfg("--method", "gptq").gptaq is False
    with pytest.raises(ValueError, match="option of --method gptq"):
        cfg("--method", "rtn", "--gptaq")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_choice_keeps_the_lower_asymmetric_error(seed, noise):
    """gptaq_choose: the kept solve is GPTAQ's or GPTQ's bit for bit, whichever has the lower measured error
    against the full-precision output; with identical inputs the two tie and GPTQ is kept."""
    from calibra.quant.gptaq import asymmetric_error

    w, x, x_q = _inputs(seed, noise=noise)
    if noise == 0.0:
        x_q = x
    n = x.shape[0]
    h, c = x_q.T @ x_q, (x - x_q).T @ x_q
    gptq = gptq_quantize(w, h, n, GPTQConfig())
    asym = gptq_quantize(w, h, n, GPTQConfig(gptaq=True), cross=c)
    kept = gptq_quantize(w, h, n, GPTQConfig(gptaq=True, gptaq_choose=True), cross=c)
    choice = kept.log.choice
    errs = {"gptq": asymmetric_error(w, gptq.weight, h, c), "gptaq": asymmetric_error(w, asym.weight, h, c)}
    assert choice["kept"] == min(errs, key=lambda k: (errs[k], k != "gptq"))
    assert choice["errors"]["gptq"] == pytest.approx(errs["gptq"]) and choice["errors"]["gptaq"] == pytest.approx(
        errs["gptaq"]
    )
    assert torch.equal(kept.codes, (asym if choice["kept"] == "gptaq" else gptq).codes)
    if noise:
        assert choice["kept"] == "gptaq"
    else:
        assert choice["kept"] == "gptq"


@pytest.mark.parametrize("seed", [0, 1])
def test_wide_choice_keeps_the_least_error_of_four_solves(seed):
    """choose_clip: GPTQ and GPTAQ, each with and without the weight-MSE clip; the kept solve is the
    one of the four with the least measured asymmetric error, bit for bit, and every error is recorded."""
    from calibra.quant.gptaq import asymmetric_error

    w, x, x_q = _inputs(seed, noise=0.3)
    n = x.shape[0]
    h, c = x_q.T @ x_q, (x - x_q).T @ x_q
    solves = {
        "gptq": gptq_quantize(w, h, n, GPTQConfig(bits=3, group_size=32)),
        "gptaq": gptq_quantize(w, h, n, GPTQConfig(bits=3, group_size=32, gptaq=True), cross=c),
        "gptq+mse": gptq_quantize(w, h, n, GPTQConfig(bits=3, group_size=32, mse_clip=True)),
        "gptaq+mse": gptq_quantize(w, h, n, GPTQConfig(bits=3, group_size=32, mse_clip=True, gptaq=True), cross=c),
    }
    errs = {k: asymmetric_error(w, v.weight, h, c) for k, v in solves.items()}
    cfg = GPTQConfig(bits=3, group_size=32, gptaq=True, gptaq_choose=True, choose_clip=True)
    kept = gptq_quantize(w, h, n, cfg, cross=c)
    choice = kept.log.choice
    assert set(choice["errors"]) == set(errs)
    for k in errs:
        assert choice["errors"][k] == pytest.approx(errs[k], rel=1e-9)
    assert choice["kept"] == min(errs, key=errs.get)
    assert torch.equal(kept.codes, solves[choice["kept"]].codes)
    assert errs[choice["kept"]] <= min(errs["gptq"], errs["gptaq"])
    with pytest.raises(ValueError, match="choose_clip"):
        GPTQConfig(choose_clip=True, mse_clip=True, clip_metric="output").validate()


def test_clip_choice_without_a_cross_statistic_keeps_the_lower_output_error():
    """choose_clip on plain GPTQ (what MoE experts get under the best preset): GPTQ with and without the
    weight-MSE clip, the lower tr((W-Q)H(W-Q)^T) kept bit for bit."""
    from calibra.quant.clip_search import output_error

    w, x, _ = _inputs(0, noise=0.0)
    n = x.shape[0]
    h = x.T @ x
    solves = {
        "gptq": gptq_quantize(w, h, n, GPTQConfig(bits=3, group_size=32)),
        "gptq+mse": gptq_quantize(w, h, n, GPTQConfig(bits=3, group_size=32, mse_clip=True)),
    }
    errs = {k: output_error(w, v.weight, h) for k, v in solves.items()}
    kept = gptq_quantize(w, h, n, GPTQConfig(bits=3, group_size=32, choose_clip=True))
    assert kept.log.choice["kept"] == min(errs, key=errs.get)
    assert kept.log.choice["errors"] == pytest.approx(errs, rel=1e-9)
    assert torch.equal(kept.codes, solves[kept.log.choice["kept"]].codes)


def test_preset_best():
    from calibra.quant import MRGPTQConfig, RTNConfig
    from calibra.quant.presets import apply_preset

    cfg = apply_preset("best", GPTQConfig(bits=3, group_size=64))
    assert (cfg.gptaq, cfg.gptaq_choose, cfg.choose_clip, cfg.bits, cfg.group_size) == (True, True, True, 3, 64)
    assert (cfg.desc_act, cfg.static_groups) == (True, True)  # act-order that every GPTQ export writes
    want = GPTQConfig(gptaq=True, gptaq_choose=True, choose_clip=True, desc_act=True, static_groups=True)
    assert apply_preset("best") == want
    # an output-MSE clip the caller asked for is kept, and the choice then does not toggle a weight clip
    out = apply_preset("best", GPTQConfig(mse_clip=True, clip_metric="output"))
    assert (out.mse_clip, out.clip_metric, out.choose_clip) == (True, "output", False)
    out.validate()
    for bad, match in [
        (RTNConfig(), "int GPTQ only"),
        (MRGPTQConfig(), "int GPTQ only"),
        (GPTQConfig(format="nvfp4", group_size=16), "int formats only"),
        (GPTQConfig(awq=True), "awq"),
    ]:
        with pytest.raises(ValueError, match=match):
            apply_preset("best", bad)
    with pytest.raises(ValueError, match="unknown preset"):
        apply_preset("fastest")
    with pytest.raises(ValueError, match="gptaq_choose"):
        GPTQConfig(gptaq_choose=True).validate()


def test_preset_best_records_the_choice_per_module(tmp_path):
    import json

    qm, rep = calibra.quantize(
        "builtin:tiny-llama",
        None,
        CalibrationConfig(**CAL),
        preset="best",
        output=tmp_path / "o",
        evaluate=False,
        progress=False,
        echo=None,
    )
    assert rep["preset"] == "best"
    kept = rep["gptaq"]["kept"]
    assert sum(kept.values()) == len(qm.layers) == 28
    # layer 0's q/k/v see identical inputs in both streams: GPTAQ's solves tie GPTQ's and GPTQ's are kept
    for p in "qkv":
        assert qm.layers[f"model.layers.0.self_attn.{p}_proj"].log.choice["kept"] in ("gptq", "gptq+mse")
    assert kept["gptaq"] + kept.get("gptaq+mse", 0) > 0
    manifest = json.loads((tmp_path / "o" / "quantization.json").read_text())
    assert manifest["config"]["gptaq_choose"] is True and manifest["config"]["choose_clip"] is True
    mods = manifest["modules"]
    names = {"gptaq", "gptq", "gptaq+mse", "gptq+mse"}
    assert {mods[n]["choice"] for n in qm.layers} <= names
    for ql in qm.layers.values():  # every candidate's error recorded, the least one kept
        errs = ql.log.choice["errors"]
        assert set(errs) == names and errs[ql.log.choice["kept"]] == min(errs.values())


def test_cli_preset_is_a_gptq_recipe():
    from calibra.cli import _cmd_quantize, build_parser

    args = build_parser().parse_args(
        ["quantize", "--input", "x", "--output", "y", "--preset", "best", "--method", "rtn"]
    )
    with pytest.raises(ValueError, match="GPTQ recipe"):
        _cmd_quantize(args)
