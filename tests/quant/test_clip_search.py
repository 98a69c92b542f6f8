"""The clipping search ranked by the output error (clip_metric "output"): on a layer whose outlier input
channels carry its largest weights, AutoGPTQ's weight-MSE clip makes RTN and GPTQ worse than no clip,
while the output search is never worse than no clip (measured tr((W-Q) H (W-Q)^T)); the same on real
calibration statistics of builtin:tiny-llama; the guard; the config checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from calibra.quant import GPTQConfig, MRGPTQConfig, RTNConfig, clip_search, gptq_quantize, rtn, rtn_quantize
from calibra.quant.clip_search import output_error

GRIDS = {  # (bits, group_size, format)
    "int4-g128": (4, 128, "int"),
    "int4-channel": (4, -1, "int"),
    "int3-g32": (3, 32, "int"),
    "nvfp4": (4, 16, "nvfp4"),
    "mxfp4": (4, 32, "mxfp4"),
}


def outlier_layer(out=64, n=256, tokens=2048, seed=0):
    """(W, H, tokens): six input channels with 30x the activation scale, whose weights are the largest of
    their groups (so a clip that saves weight error spends it on the columns that matter)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    idx = torch.randperm(n, generator=g)[:6]
    x[:, idx] *= 30.0
    w = torch.randn(out, n, generator=g) * 0.05
    w[:, idx] *= 4.0
    return w, x.T @ x, tokens


def _configs(grid, **gptq_kw):
    bits, gs, fmt = GRIDS[grid]
    base = dict(bits=bits, group_size=gs, format=fmt)
    return (
        [RTNConfig(**base), RTNConfig(**base, mse_clip=True), RTNConfig(**base, mse_clip=True, clip_metric="output")],
        [
            GPTQConfig(**base, **gptq_kw),
            GPTQConfig(**base, mse_clip=True, **gptq_kw),
            GPTQConfig(**base, mse_clip=True, clip_metric="output", **gptq_kw),
        ],
    )


def _errors(w, h, n, grid, **gptq_kw):
    rtn_cfgs, gptq_cfgs = _configs(grid, **gptq_kw)
    r = [rtn_quantize(w, c, h=h, n_tokens=n) for c in rtn_cfgs]
    g = [gptq_quantize(w, h, n, c) for c in gptq_cfgs]
    return [output_error(w, q.weight, h) for q in r], [output_error(w, q.weight, h) for q in g], r, g


@pytest.mark.parametrize("grid", ["int4-g128", "int4-channel", "int3-g32", "nvfp4"])
def test_outlier_layer_weight_mse_hurts_output_search_helps(grid):
    w, h, n = outlier_layer()
    (r_none, r_mse, r_out), (g_none, g_mse, g_out), r, g = _errors(w, h, n, grid)
    # the failure the search fixes: weight-MSE clipping raises the output error over no clip
    assert r_mse > r_none and g_mse > g_none
    # the output search: below no clip (and so below weight MSE), and it says it kept its clip
    assert r_out < r_none and g_out < g_none
    assert r[2].log.clip == "output" and g[2].log.clip == "output"
    assert r[2].log.output_error == pytest.approx(r_out) and g[2].log.output_error == pytest.approx(g_out)


@pytest.mark.parametrize("gptq_kw", [dict(desc_act=True), dict(desc_act=True, static_groups=True)])
def test_outlier_layer_act_order_and_static_groups(gptq_kw):
    w, h, n = outlier_layer(seed=1)
    _, (g_none, g_mse, g_out), _, g = _errors(w, h, n, "int4-g128", **gptq_kw)
    assert g_out < g_none and g_out < g_mse


def test_mxfp4_never_worse_than_no_clip():
    w, h, n = outlier_layer(seed=2)
    (r_none, _, r_out), (g_none, _, g_out), _, _ = _errors(w, h, n, "mxfp4")
    assert r_out <= r_none and g_out <= g_none


def test_result_tensors_describe_the_weight():
    """The output-searched result still packs: codes/scales/zeros rebuild the dequantized weight."""
    w, h, n = outlier_layer(seed=3)
    for grid in ("int4-g128", "nvfp4"):
        _, _, r, g = _errors(w, h, n, grid)
        for ql in (r[2], g[2]):
            assert torch.equal(ql.dequantize(), ql.weight)


def test_guard_drops_a_clip_that_raises_the_output_error(monkeypatch):
    """A search that returns a bad clip (every group cut to half its range) is measured, found worse than
    no clip, and dropped: the result is plain RTN/GPTQ bit for bit, and the log says so."""
    w, h, n = outlier_layer(seed=4)
    real = clip_search.fit_groups_weighted

    def half(wf, gs, col_w, **kw):
        return real(wf, gs, col_w, **dict(kw, shrink=torch.tensor([0.5])))

    monkeypatch.setattr(rtn, "fit_groups_weighted", half)
    import calibra.quant.gptq as gptq_mod

    monkeypatch.setattr(gptq_mod, "fit_groups_weighted", half)
    cfg = RTNConfig(bits=4, group_size=128, mse_clip=True, clip_metric="output")
    got = rtn_quantize(w, cfg, h=h, n_tokens=n)
    plain = rtn_quantize(w, RTNConfig(bits=4, group_size=128))
    assert got.log.clip == "none" and torch.equal(got.weight, plain.weight) and torch.equal(got.codes, plain.codes)
    gcfg = GPTQConfig(bits=4, group_size=128, mse_clip=True, clip_metric="output")
    gg = gptq_quantize(w, h, n, gcfg)
    gplain = gptq_quantize(w, h, n, GPTQConfig(bits=4, group_size=128))
    assert gg.log.clip == "none" and torch.equal(gg.weight, gplain.weight)


def test_builtin_tiny_llama_real_statistics():
    """Real calibration Hessians of builtin:tiny-llama: per Linear the output search is never worse than no
    clip, and over the layer it beats weight-MSE clipping (RTN and GPTQ, int4 g128 and NVFP4)."""
    from calibra.api import calibrate
    from calibra.assets import ASSETS_DIR, load_model
    from calibra.data import CalibrationConfig

    if not (ASSETS_DIR / "models" / "tiny-llama" / "config.json").is_file():
        pytest.skip("builtin:tiny-llama is not installed")
    stats = calibrate(
        "builtin:tiny-llama",
        CalibrationConfig(num_samples=8, sequence_length=128),
        device="cpu",
        progress=False,
        echo=None,
    )
    model = load_model("builtin:tiny-llama")[0]
    mods = dict(model.named_modules())
    keys = [k.removeprefix("hessian/sum/") for k in stats.tensors if k.startswith("hessian/sum/")]
    # one of each input kind of the first decoder layer (the residual stream, attention output, MLP hidden)
    keys = [k for k in keys if k.startswith("model.layers.0.") and k.endswith(("q_proj", "o_proj", "down_proj"))]
    assert len(keys) == 3
    for grid in ("int4-g128", "nvfp4"):
        totals = torch.zeros(6, dtype=torch.float64)
        for k in keys:
            w = mods[k].weight.data.float()
            h, n = stats.tensors[f"hessian/sum/{k}"], stats.count("hessian", k)
            (r_none, r_mse, r_out), (g_none, g_mse, g_out), _, _ = _errors(w, h, n, grid)
            assert r_out <= r_none and g_out <= g_none, k
            totals += torch.tensor([r_none, r_mse, r_out, g_none, g_mse, g_out], dtype=torch.float64)
        assert totals[2] < totals[1] and totals[5] < totals[4], (grid, totals.tolist())


def test_config_checks():
    with pytest.raises(ValueError, match="clip_metric 'output'.*mse_clip=True"):
        RTNConfig(clip_metric="output").validate()
    with pytest.raises(ValueError, match="clip_metric must be one of"):
        GPTQConfig(mse_clip=True, clip_metric="hessian").validate()
    with pytest.raises(ValueError, match="MRGPTQConfig.*needs mse=True"):
        MRGPTQConfig(format="nvfp4", mse=False, clip_metric="output").validate()
    assert RTNConfig(mse_clip=True, clip_metric="output").needs_hessian
    assert not RTNConfig(mse_clip=True).needs_hessian
    w, _, _ = outlier_layer()
    with pytest.raises(ValueError, match="needs the calibration Hessian of w1"):
        rtn_quantize(w, RTNConfig(mse_clip=True, clip_metric="output"), name="w1")
    # the defaults stay AutoGPTQ's
    assert dataclasses.asdict(GPTQConfig())["clip_metric"] == "weight" and not GPTQConfig().mse_clip


@pytest.mark.parametrize("fmt", ["int", "nvfp4", "mxfp4"])
def test_search_values_equal_the_sweeps_quantizer(fmt):
    """The search's fast value path rounds exactly as the sweep's quantizer, ties and zero scales included."""
    from calibra.ops.gptq import quantize_with_params

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 32, generator=g) * 3
    x[0, :12] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, 7.0, -7.0, 0.0])
    s = torch.rand(300, 1, generator=g) * 2
    s[3] = 0.0 if fmt != "int" else 1.0
    z = torch.full_like(s, 8.0) if fmt == "int" else torch.zeros_like(s)
    gsc = 37.0 if fmt == "nvfp4" else 1.0
    want = quantize_with_params(x, s, z, format=fmt, bits=4, global_scale=gsc)[1]
    assert torch.equal(clip_search.grid_values(x, s, z, fmt, 4, gsc), want)
