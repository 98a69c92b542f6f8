"""MR-GPTQ's per-layer choice (MRGPTQConfig.choose, the default): the kept candidate's measured output
error is at most each alternative's -- RTN, the rotated solve alone (the paper's method), unrotated GPTQ on
the FP4 grid -- each computed here independently; the rotation is recorded only where it was kept."""

from __future__ import annotations

import pytest
import torch

from calibra.quant import GPTQConfig, MRGPTQConfig, RTNConfig, gptq_quantize, mr_gptq_quantize, rtn_quantize
from calibra.quant.clip_search import output_error
from calibra.quant.mr_gptq import CANDIDATES, candidates_of

from ._layers import layer
from .test_clip_search import outlier_layer

GROUP = {"nvfp4": 16, "mxfp4": 32}


def alternatives(w, h, n, fmt):
    """label -> dense weight of each method the choice must not lose to."""
    b = GROUP[fmt]
    return {
        "rtn": rtn_quantize(w, RTNConfig(bits=4, group_size=b, format=fmt)).weight,
        "mr-gptq-rotated": mr_gptq_quantize(w, h, n, MRGPTQConfig(format=fmt, choose=False)).dense(),
        "gptq-fp4": gptq_quantize(w, h, n, GPTQConfig(bits=4, group_size=b, format=fmt)).weight,
        "gptq-fp4-mse": gptq_quantize(
            w, h, n, GPTQConfig(bits=4, group_size=b, format=fmt, mse_clip=True, mse_maxshrink=0.3)
        ).weight,
    }


def check_choice(w, h, n, fmt, candidates="quick"):
    config = MRGPTQConfig(format=fmt, candidates=candidates)
    ql = mr_gptq_quantize(w, h, n, config)
    chosen = output_error(w, ql.dense(), h)
    ch = ql.log.choice
    tried = candidates_of(config)
    assert set(tried) <= set(CANDIDATES) and len(tried) == (7 if candidates == "all" else 3)
    assert ch["kept"] in tried and set(ch["output_error"]) == set(tried)
    assert ql.log.output_error == pytest.approx(chosen, rel=1e-6)
    assert min(ch["output_error"].values()) == ch["output_error"][ch["kept"]]
    for label, dense in alternatives(w, h, n, fmt).items():
        if candidates == "quick" and label == "gptq-fp4":
            continue  # unrotated GPTQ without the scale search is only among "all"
        assert chosen <= output_error(w, dense, h) * (1 + 1e-6), (label, ch)
    # the rotation is applied exactly where the kept candidate is rotated; the tensors still pack
    assert (ql.rotation is not None) == ch["rotated"] == ("-rotated-" in ch["kept"])
    assert torch.equal(ql.dequantize(), ql.weight)
    assert ql.method == ql.log.method == "mr_gptq"
    return ch


@pytest.mark.parametrize("candidates", ["quick", "all"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_choice_never_loses_on_synthetic_layers(fmt, candidates):
    kept = set()
    for w, h, n in (outlier_layer(out=32, n=128, seed=5), layer(out=32, n=128, seed=6, outliers=True)[:3]):
        kept.add(check_choice(w, h, n, fmt, candidates)["kept"])
    assert kept  # (which one wins depends on the layer: asserted only through the errors)


def test_choice_never_loses_on_builtin_tiny_llama():
    """Real calibration Hessians of builtin:tiny-llama's first decoder layer (q, o, down), NVFP4: per Linear the kept
    candidate is at most RTN, the rotated solve and unrotated GPTQ."""
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
    for k in keys:
        w = mods[k].weight.data.float()
        check_choice(w, stats.tensors[f"hessian/sum/{k}"], stats.count("hessian", k), "nvfp4")


def test_choose_off_is_the_rotated_solve():
    w, h, n = outlier_layer(out=32, n=128, seed=7)
    ql = mr_gptq_quantize(w, h, n, MRGPTQConfig(format="nvfp4", choose=False))
    assert ql.rotation is not None and ql.log.choice is None
    with pytest.raises(ValueError, match="MRGPTQConfig.choose must be a bool"):
        MRGPTQConfig(choose=1).validate()
    with pytest.raises(ValueError, match="candidates must be 'quick' or 'all'"):
        MRGPTQConfig(candidates="best").validate()
