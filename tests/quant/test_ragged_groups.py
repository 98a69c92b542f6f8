"""Widths a group does not divide (issue 21): a ragged last group, columns [g * G, in) with G = in // gs + 1
groups, as the reference GPTQ lays them out (g_idx = col // gs). 172 columns with groups of 32: five whole
groups and one of 12."""

import pytest
import torch

from calibra.ops import dequantize, quantize
from calibra.ops._ref.quantize import quantize_int as ref_quantize_int
from calibra.quant import GPTQConfig, RTNConfig, gptq_quantize, rtn_quantize
from calibra.quant.config import MRGPTQConfig, check_layers
from calibra.quant.gptq import reference_sweep
from tests.quant._layers import layer, proxy_error

N, GS = 172, 32  # the example (an intermediate size of 172): groups of 32, 32, 32, 32, 32, 12


def _slices(n=N, gs=GS):
    return [(a, min(a + gs, n)) for a in range(0, n, gs)]


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rtn_each_group_is_the_rtn_of_its_own_columns(sym, dtype):
    """Every group, the ragged one included, equals the reference RTN of that group's columns alone (one
    group per row), bit for bit: the padding the ops use inside adds nothing."""
    w = (torch.randn(24, N, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    qt = quantize(w, bits=4, group_size=GS, symmetric=sym)
    assert qt.scales.shape == (24, 6) and qt.zeros.shape == (24, 6) and qt.codes.shape == (24, N)
    for g, (a, b) in enumerate(_slices()):
        codes, scales, zeros = ref_quantize_int(w[:, a:b].contiguous(), 4, -1, sym)
        assert torch.equal(qt.codes[:, a:b], codes), g
        assert torch.equal(qt.scales[:, g : g + 1], scales) and torch.equal(qt.zeros[:, g : g + 1], zeros), g
    want = torch.cat([(qt.codes[:, a:b].float() - qt.zeros[:, g : g + 1].float()) * qt.scales[:, g : g + 1].float()
                      for g, (a, b) in enumerate(_slices())], 1).to(dtype)  # fmt: skip
    assert torch.equal(dequantize(qt), want)


@pytest.mark.parametrize("kw", [{}, {"sym": False}, {"mse_clip": True}, {"mse_clip": True, "clip_metric": "output"}])
def test_rtn_solver_ragged(kw):
    w, h, tokens, _ = layer(out=16, n=N)
    ql = rtn_quantize(w, RTNConfig(group_size=GS, **kw), h=h, n_tokens=tokens)
    assert ql.scales.shape == (16, 6) and ql.codes.shape == (16, N)
    assert torch.equal(ql.dequantize(), ql.weight)
    if not kw.get("mse_clip"):
        assert torch.equal(ql.codes, quantize(w, bits=4, group_size=GS, symmetric=kw.get("sym", True)).codes)


def _reference_gptq(w, h, n_tokens, *, bits=4, gs=GS, sym=True, damp=0.01, act_order=False, static=False):
    """GPTQ as the reference implementation writes it (IST-DASLab / AutoGPTQ), in float64, one column at a
    time with the whole update (no lazy batches): a group's parameters are fitted when the sweep reaches its
    first column, from W[:, i:i + gs] -- a slice that is simply shorter for the last group. Dead channels,
    live-mean damping, act-order and static groups as calibra documents them."""
    wk = w.double().clone()
    hh = h.double() * 2 / n_tokens
    dead = hh.diagonal() == 0
    base = float(hh.diagonal()[~dead].mean())
    hh[dead, dead] = 1.0
    wk[:, dead] = 0.0
    maxq = 2**bits - 1

    def params(x):  # in float32, as the reference runs (the scale is stored in w's dtype, float32)
        x = x.float()
        mn, mx = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
        s = (2 * torch.maximum(-mn, mx) if sym else mx - mn) / maxq
        s[s == 0] = 1
        z = torch.full_like(s, (maxq + 1) / 2) if sym else torch.round(-mn / s).clamp(0, maxq)
        return s.double(), z.double()

    n = wk.shape[1]
    table = [params(wk[:, a:b]) for a, b in _slices(n, gs)] if static else None
    perm = torch.sort(hh.diagonal(), descending=True, stable=True).indices if act_order else torch.arange(n)
    wk, hh = wk[:, perm], hh[perm][:, perm]
    hh = hh + damp * base * torch.eye(n, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hh)), upper=True)
    q = torch.zeros_like(wk)
    for i in range(n):
        if static:
            s, z = table[int(perm[i]) // gs]
        elif i % gs == 0:
            s, z = params(wk[:, i : i + gs])
        col = wk[:, i].clone()
        # the rounding in float32: a group's extreme sits on a tie (-amax / s = -7.5 at 4 bits symmetric)
        # that float64 and float32 quotients may resolve differently
        code = torch.clamp(torch.round(col.float() / s.float()).double() + z, 0, maxq)
        q[:, i] = (code - z) * s
        err = (col - q[:, i]) / u[i, i]
        wk[:, i:] -= err[:, None] * u[i, i:][None]
    out = torch.empty_like(q)
    out[:, perm] = q
    return out.float()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("order", ["plain", "act-order", "static"])
def test_gptq_ragged_equals_the_reference_algorithm(sym, order):
    """calibra's GPTQ (native lazy-batch sweep, float32) on 172 columns with groups of 32 equals the reference
    algorithm's float64 column loop to float tolerance (the two differ in rounding order only: a few codes
    may flip at a rounding boundary), and the ragged group's scales come from its 12 columns."""
    w, h, tokens, _ = layer(out=32, n=N, seed=3)
    h[7, :] = h[:, 7] = 0.0  # a dead channel
    act, static = order != "plain", order == "static"
    cfg = GPTQConfig(group_size=GS, sym=sym, desc_act=act, static_groups=static, block_size=64)
    ours = gptq_quantize(w, h, tokens, cfg)
    ref = _reference_gptq(w, h, tokens, sym=sym, act_order=act, static=static)
    assert ours.scales.shape == (32, 6)
    assert torch.equal(ours.dequantize(), ours.weight)
    close = torch.isclose(ours.weight, ref, rtol=1e-4, atol=1e-6)
    assert float(close.float().mean()) > 0.995, float(close.float().mean())
    e_ours, e_ref = proxy_error(w, ours.weight, h), proxy_error(w, ref, h)
    assert e_ours == pytest.approx(e_ref, rel=0.01)
    if order == "act-order":  # g_idx: the reference's sweep-order groups, the last one ragged
        assert ours.g_idx is not None and int(ours.g_idx.max()) == 5
        assert int((ours.g_idx == 5).sum()) == N - 5 * GS


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"desc_act": True},
        {"desc_act": True, "static_groups": True},
        {"mse_clip": True, "sym": False},
        {"mse_clip": True, "clip_metric": "output"},
        {"desc_act": True, "mse_clip": True, "clip_metric": "output"},
    ],
)
def test_gptq_options_ragged_native_equals_reference_sweep(kw):
    """Every option with the ragged group: the native sweep gives the reference sweep's bits, the result
    dequantizes to its weight, and the proxy error is below RTN's."""
    w, h, tokens, _ = layer(out=16, n=N, seed=1)
    cfg = GPTQConfig(group_size=GS, block_size=64, **kw)
    native = gptq_quantize(w, h, tokens, cfg)
    ref = gptq_quantize(w, h, tokens, cfg, sweep=reference_sweep)
    for f in ("codes", "scales", "zeros", "g_idx", "weight"):
        a, b = getattr(native, f), getattr(ref, f)
        assert (a is None and b is None) or torch.equal(a, b), f
    assert native.scales.shape == (16, 6)
    assert torch.equal(native.dequantize(), native.weight)
    rtn = rtn_quantize(w, RTNConfig(group_size=GS, sym=cfg.sym))
    assert proxy_error(w, native.weight, h) < proxy_error(w, rtn.weight, h)


def test_gptaq_ragged():
    """GPTAQ with a zero cross statistic is GPTQ, ragged group included (bit for bit)."""
    w, h, tokens, _ = layer(out=16, n=N, seed=2)
    plain = gptq_quantize(w, h, tokens, GPTQConfig(group_size=GS))
    asym = gptq_quantize(w, h, tokens, GPTQConfig(group_size=GS, gptaq=True), cross=torch.zeros_like(h))
    assert torch.equal(plain.codes, asym.codes) and torch.equal(plain.scales, asym.scales)


def test_fp4_and_mr_gptq_still_refuse_a_partial_block():
    """FP4's scale blocks (16/32) are never ragged: the config names the layer and the way out."""
    with pytest.raises(ValueError, match=r"nvfp4 needs in_features divisible by its scale block 16.*down_proj"):
        check_layers(RTNConfig(format="nvfp4", group_size=16), {"mlp.down_proj": N})
    with pytest.raises(ValueError, match=r"mxfp4 needs in_features divisible by 32.*down_proj"):
        check_layers(MRGPTQConfig(format="mxfp4"), {"mlp.down_proj": N})
    check_layers(GPTQConfig(group_size=GS), {"mlp.down_proj": N})  # int: a ragged last group, no refusal
