"""RTN (with MSE clipping), MR-GPTQ and config validation."""

import pytest
import torch

import calibra
from calibra.ops import hadamard
from calibra.quant import GPTQConfig, MRGPTQConfig, RTNConfig, check_layers, mr_gptq_quantize, rtn_quantize
from tests.quant._layers import layer


@pytest.mark.parametrize(
    "fmt,bits,gs,sym",
    [
        ("int", 4, 128, True),
        ("int", 3, 32, False),
        ("int", 2, -1, True),
        ("int", 8, 64, False),
        ("mxfp4", 4, 32, True),
        ("nvfp4", 4, 16, True),
    ],
)
def test_rtn_plain_is_ops_quantize_and_mse_clip_lowers_mse(fmt, bits, gs, sym):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g) ** 3  # heavy tails: clipping pays
    plain = rtn_quantize(w, RTNConfig(bits=bits, group_size=gs, sym=sym, format=fmt))
    qt = calibra.ops.quantize(w, bits=bits, group_size=gs, symmetric=sym, format=fmt)
    assert torch.equal(plain.codes, qt.codes) and torch.equal(plain.weight, calibra.ops.dequantize(qt))
    mse = rtn_quantize(w, RTNConfig(bits=bits, group_size=gs, sym=sym, format=fmt, mse_clip=True))
    e_plain = float(((plain.weight - w) ** 2).sum())
    e_mse = float(((mse.weight - w) ** 2).sum())
    if bits == 8:  # 255 levels: clipping rarely pays, but it never hurts
        assert e_mse <= e_plain
    else:
        assert e_mse < e_plain * (0.95 if fmt == "int" else 1.0), (e_mse, e_plain)
    assert torch.equal(mse.dequantize(), mse.weight)
    # per group, never worse (the unclipped range is a candidate)
    n_g = 1 if gs == -1 else 256 // gs

    def per_g(q):
        return ((q - w) ** 2).reshape(32, n_g, -1).sum(-1)

    assert bool((per_g(mse.weight) <= per_g(plain.weight) * (1 + 1e-6)).all())


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_mr_gptq_beats_rtn_on_outlier_activations(fmt):
    w, h, tokens, x = layer(out=32, n=256, tokens=2048, seed=1, outliers=True)
    r = mr_gptq_quantize(w, h, tokens, MRGPTQConfig(format=fmt, choose=False), name="m")
    b = 16 if fmt == "nvfp4" else 32
    assert r.rotation == {"kind": "hadamard", "block_size": b, "axis": "in"}
    rtn = rtn_quantize(w, RTNConfig(bits=4, group_size=b, format=fmt))
    y = x @ w.T
    # the stored (rotated, quantized) weight applied to rotated inputs
    y_mr = hadamard(x, b) @ r.weight.T
    y_rtn = x @ rtn.weight.T
    e_mr, e_rtn = float(((y_mr - y) ** 2).mean()), float(((y_rtn - y) ** 2).mean())
    assert e_mr < 0.7 * e_rtn, (e_mr, e_rtn)
    assert torch.allclose(x @ r.dense().T, y_mr, rtol=1e-4, atol=1e-4)  # dense() un-rotates consistently
    assert torch.equal(r.dequantize(), r.weight)


def test_rotation_identity():
    # W' applied to rotated x equals W x (before quantization), and up to quantization error after
    w, h, tokens, x = layer(out=16, n=64, seed=2)
    for b in (16, 32):
        assert torch.allclose(hadamard(x, b) @ hadamard(w, b).T, x @ w.T, atol=1e-4)
    r = mr_gptq_quantize(w, h, tokens, MRGPTQConfig(format="nvfp4", choose=False))
    rel = float(((hadamard(x, 16) @ r.weight.T - x @ w.T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    assert rel < 0.02


@pytest.mark.parametrize(
    "cfg,msg",
    [
        (RTNConfig(bits=9), r"RTNConfig.bits must be an int in \[2, 8\]"),
        (RTNConfig(bits=1), r"RTNConfig.bits must be"),
        (RTNConfig(group_size=0), r"RTNConfig.group_size must be -1"),
        (RTNConfig(format="nvfp4", group_size=32), r"RTNConfig.group_size must be 16 for nvfp4"),
        (RTNConfig(mse_maxshrink=1.5), r"RTNConfig.mse_maxshrink must be in \(0, 1\)"),
        (GPTQConfig(damp_percent=0.0), r"GPTQConfig.damp_percent must be in \(0, 1\]"),
        (GPTQConfig(damp_percent=2.0), r"GPTQConfig.damp_percent"),
        (GPTQConfig(damp_ladder=(1.0, 0.1)), r"GPTQConfig.damp_ladder must be"),
        (GPTQConfig(block_size=0), r"GPTQConfig.block_size must be an int in \[1, 4096\]"),
        (GPTQConfig(bits=16), r"GPTQConfig.bits"),
        (
            GPTQConfig(format="mxfp4", group_size=32, desc_act=True),
            r"GPTQConfig.desc_act with format mxfp4 needs static_groups=True",
        ),
        (MRGPTQConfig(format="int"), r"MRGPTQConfig.format must be 'mxfp4' or 'nvfp4'"),
        (MRGPTQConfig(block_size=10**5), r"MRGPTQConfig.block_size"),
        (MRGPTQConfig(desc_act=True), r"MRGPTQConfig.desc_act with format mxfp4 needs static_groups=True"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_config_validation(cfg, msg):
    with pytest.raises(ValueError, match=r"^\[quantize\] " + msg):
        cfg.validate()


def test_act_order_refused_where_g_idx_cannot_be_expressed():
    cfg = GPTQConfig(desc_act=True)
    cfg.validate()  # GPTQ exports carry g_idx
    with pytest.raises(ValueError, match="needs static_groups=True for this export format"):
        cfg.validate(allow_g_idx=False)
    GPTQConfig(desc_act=True, static_groups=True).validate(allow_g_idx=False)
    MRGPTQConfig(desc_act=True, static_groups=True).validate()


def test_check_layers_lists_every_bad_layer():
    layers = {
        "model.layers.0.mlp.down_proj": 1000,
        "model.layers.0.mlp.up_proj": 1024,
        "model.layers.1.mlp.down_proj": 1000,
    }
    check_layers(GPTQConfig(group_size=128), layers)  # int groups: a ragged last group, no refusal
    with pytest.raises(ValueError) as e:
        check_layers(GPTQConfig(format="nvfp4", bits=4, group_size=16), layers)
    text = str(e.value)
    assert text.startswith("[quantize] 2 layer(s)")
    assert "model.layers.0.mlp.down_proj" in text and "model.layers.1.mlp.down_proj" in text
    assert "up_proj" not in text
    check_layers(GPTQConfig(group_size=-1), layers)
    with pytest.raises(ValueError, match="nvfp4 needs in_features divisible by 16"):
        check_layers(MRGPTQConfig(format="nvfp4"), {"a": 1000})
