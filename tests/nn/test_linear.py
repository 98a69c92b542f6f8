"""calibra.nn: the drop-in Linear replacements equal the original (dequantized / pruned) Linear."""

import pytest
import torch
from torch import nn

import calibra
from calibra.nn import Sparse24Linear, W4A16Linear, replace_linears
from tests.ops.harness import DEVICES, assert_close_2x, run_native


def gen(seed):
    return torch.Generator().manual_seed(seed)


def linear(in_f, out_f, dtype, bias=True, seed=0):
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=gen(seed)) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=gen(seed + 1)))
    return lin.to(dtype)


@pytest.mark.parametrize("group,sym", [(128, True), (32, False), (-1, True), (64, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w4a16_linear_cpu_equals_dequantized_linear(group, sym, dtype):
    lin = linear(256, 192, dtype, seed=group + sym)
    q = calibra.ops.quantize(lin.weight.detach(), bits=4, group_size=group, symmetric=sym)
    ref = nn.Linear(256, 192).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(calibra.ops.dequantize(q))
        ref.bias.copy_(lin.bias)
    mod = W4A16Linear.from_quantized(q, lin.bias)
    assert (mod.zeros is None) == sym and mod.dtype == dtype
    x = torch.randn(3, 5, 256, generator=gen(7)).to(dtype)
    with torch.no_grad():
        assert torch.equal(mod(x), ref(x))
        assert torch.equal(W4A16Linear.from_linear(lin, group_size=group, symmetric=sym)(x), ref(x))


def test_w4a16_linear_state_dict_round_trip():
    mod = W4A16Linear.from_linear(linear(128, 64, torch.float16), group_size=32, symmetric=False)
    fresh = W4A16Linear(128, 64, group_size=32, symmetric=False, bias=True, dtype=torch.float16)
    fresh.load_state_dict(mod.state_dict())
    x = torch.randn(2, 128).half()
    with torch.no_grad():
        assert torch.equal(fresh(x), mod(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse24_linear_cpu_equals_pruned_linear(dtype):
    lin = linear(128, 48, dtype)
    with torch.no_grad():
        mask = calibra.ops.nm_mask(lin.weight.abs(), 2, 4)
        lin.weight.mul_(mask)
    mod = Sparse24Linear.from_linear(lin)
    x = torch.randn(4, 128, generator=gen(3)).to(dtype)
    with torch.no_grad():
        assert torch.equal(mod.dense_weight(), lin.weight)
        assert torch.equal(mod(x), lin(x))


def test_sparse24_linear_rejects_dense_weight():
    with pytest.raises(ValueError, match=r"\[compress_24\] w is not 2:4 sparse"):
        Sparse24Linear.from_linear(linear(64, 16, torch.float16))


def test_shape_limits_are_errors():
    with pytest.raises(ValueError, match=r"\[calibra.nn\] W4A16Linear needs out_features % 64 == 0"):
        W4A16Linear.from_linear(linear(128, 40, torch.float16))
    with pytest.raises(
        ValueError, match=r"\[calibra.nn\] Sparse24Linear needs out_features % 16 == 0 and in_features % 64"
    ):
        Sparse24Linear(100, 16)


def test_replace_linears_swaps_and_reports():
    model = nn.Sequential(
        linear(128, 64, torch.float16), nn.ReLU(), linear(64, 40, torch.float16), linear(40, 64, torch.float16)
    )
    x = torch.randn(2, 128).half()
    report = replace_linears(model, lambda name, lin: W4A16Linear.from_linear(lin, group_size=64))
    assert report["0"] == "replaced" and isinstance(model[0], W4A16Linear)
    assert "out_features % 64" in report["2"] and isinstance(model[2], nn.Linear)  # 40 outputs: kept, reason given
    assert "in_features % 64" in report["3"]
    with torch.no_grad():
        assert model(x).shape == (2, 64)
    keep = replace_linears(model, lambda name, lin: None)
    assert keep == {"2": "kept", "3": "kept"}


@pytest.mark.parametrize("device", [d for d in DEVICES if d.id == "cuda"])
@pytest.mark.parametrize("m", [1, 16, 77])
def test_cuda_modules_use_the_native_gemms(device, m):
    lin = linear(512, 256, torch.float16)
    mod = W4A16Linear.from_linear(lin, group_size=128).cuda()
    x = torch.randn(m, 512, generator=gen(m)).half()
    y = run_native("w4a16_gemm", lambda: mod(x.cuda()), "cuda").cpu()
    w = mod.dequantized_weight().cpu()
    exact = x.double() @ w.double().T + lin.bias.double()
    assert_close_2x(y, exact, (x.float() @ w.float().T + lin.bias.float()).half(), atol=1e-2, what="W4A16Linear")
    with torch.no_grad():
        lin.weight.mul_(calibra.ops.nm_mask(lin.weight.abs(), 2, 4))
    smod = Sparse24Linear.from_linear(lin).cuda()
    y = run_native("sparse24_gemm", lambda: smod(x.cuda()), "cuda").cpu()
    exact = x.double() @ lin.weight.double().T + lin.bias.double()
    assert_close_2x(
        y, exact, (x.float() @ lin.weight.float().T + lin.bias.float()).half(), atol=1e-2, what="Sparse24Linear"
    )


def test_w4a16_from_quantized_model_keeps_the_logits():
    # calibra.quantize's model holds the dequantized weights; swapping in W4A16Linear (CPU path) must not
    # change a single logit.
    from calibra.nn import w4a16_from_quantized_model
    from calibra.quant import RTNConfig

    qm, _ = calibra.quantize(
        "builtin:tiny-llama",
        RTNConfig(bits=4, group_size=64, sym=False),
        evaluate=False,
        progress=False,
        echo=lambda *a, **k: None,
        dtype="bfloat16",
    )
    ids = torch.randint(0, 4000, (1, 16), generator=gen(0))
    with torch.no_grad():
        ref = qm.model(ids).logits
    report = w4a16_from_quantized_model(qm)
    assert sum(v == "replaced" for v in report.values()) == 28 and report["lm_head"] == "kept"
    assert isinstance(qm.model.model.layers[0].mlp.down_proj, W4A16Linear)
    with torch.no_grad():
        assert torch.equal(qm.model(ids).logits, ref)
