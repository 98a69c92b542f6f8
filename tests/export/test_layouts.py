"""Export layouts without any client: unpack what calibra wrote and dequantize it with the formulas
of each format's spec (FORMATS.md) -> must equal QuantizedLayer.dequantize() exactly (int formats)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import calibra.export as E
from calibra.ops import unpack
from calibra.quant import GPTQConfig, RTNConfig
from tests.export import _qmodel as Q


def _load(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def tok():
    return Q.tokenizer()


def _gptq_dequant(t, name, bits, v1, out, n):
    qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    q = unpack(qweight, bits, length=n, dim=0).long()  # [in, out]
    z = unpack(qzeros, bits, length=out, dim=1).long() + (1 if v1 else 0)  # [G, out]
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g])).T  # [out, in]


@pytest.mark.parametrize(
    "cfg,v1",
    [
        (RTNConfig(bits=4, group_size=32, sym=True), True),
        (RTNConfig(bits=4, group_size=32, sym=False), False),
        (RTNConfig(bits=8, group_size=-1, sym=True), True),
        (RTNConfig(bits=3, group_size=32, sym=True), True),
        (GPTQConfig(bits=4, group_size=32, sym=True, desc_act=True), True),
        (GPTQConfig(bits=4, group_size=32, sym=False, desc_act=True), False),
    ],
)
def test_gptq_layout(tmp_path, tok, cfg, v1):
    qm = Q.quantize(Q.tiny_llama(), tok, cfg)
    p = E.export(qm, tmp_path / "o", "gptq")[0]
    qc = json.loads((p / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == ("gptq" if v1 else "gptq_v2")
    assert qc == json.loads((p / "quantize_config.json").read_text())
    assert qc["desc_act"] == bool(getattr(cfg, "desc_act", False))
    t = _load(p)
    for name, l in qm.layers.items():
        out, n = l.codes.shape
        assert t[f"{name}.qweight"].dtype == torch.int32 and t[f"{name}.scales"].dtype == torch.float16
        assert t[f"{name}.qweight"].shape == (n * cfg.bits // 32, out)
        w = _gptq_dequant(t, name, cfg.bits, v1, out, n)
        # exact up to the one rounding GPTQ mandates: float16 scales
        ref = (
            l.codes.float()
            - l.zeros.float()[
                :,
                l.g_idx.long()
                if l.g_idx is not None
                else torch.arange(n) // (n if l.group_size == -1 else l.group_size),
            ]
        ) * l.scales.half().float()[
            :, l.g_idx.long() if l.g_idx is not None else torch.arange(n) // (n if l.group_size == -1 else l.group_size)
        ]
        torch.testing.assert_close(w, ref, rtol=0, atol=0)
        torch.testing.assert_close(w, l.dequantize().float(), rtol=2e-3, atol=1e-6)
        if cfg.sym and cfg.bits == 4:  # the v1 signature every GPTQ tool writes for symmetric 4-bit
            assert bool((t[f"{name}.qzeros"] == 0x77777777).all())
    assert "lm_head.weight" in t and "model.embed_tokens.weight" in t


@pytest.mark.parametrize(
    "cfg",
    [
        RTNConfig(bits=4, group_size=32, sym=True),
        RTNConfig(bits=4, group_size=32, sym=False),
        RTNConfig(bits=8, group_size=-1, sym=False),
        RTNConfig(bits=3, group_size=32, sym=False),
    ],
)
def test_compressed_tensors_int_layout(tmp_path, tok, cfg):
    """Signed convention: q_s = stored - 2^(b-1), zp_s = stored - 2^(b-1), w = (q_s - zp_s) * scale."""
    qm = Q.quantize(Q.tiny_llama(), tok, cfg)
    p = E.export(qm, tmp_path / "o", "compressed-tensors")[0]
    qc = json.loads((p / "config.json").read_text())["quantization_config"]
    w_args = qc["config_groups"]["group_0"]["weights"]
    assert (qc["format"], w_args["num_bits"], w_args["symmetric"]) == ("pack-quantized", cfg.bits, cfg.sym)
    assert qc["ignore"] == ["lm_head"]
    t = _load(p)
    off = 2 ** (cfg.bits - 1)
    for name, l in qm.layers.items():
        out, n = l.codes.shape
        assert t[f"{name}.weight_shape"].tolist() == [out, n]
        q_s = unpack(t[f"{name}.weight_packed"], cfg.bits, length=n).long() - off
        assert int(q_s.min()) >= -off and int(q_s.max()) <= off - 1
        scale = t[f"{name}.weight_scale"].float()
        G = scale.shape[1]
        if cfg.sym:
            assert f"{name}.weight_zero_point" not in t
            zp_s = torch.zeros(out, G, dtype=torch.long)
        else:
            zp_words = t[f"{name}.weight_zero_point"]
            assert zp_words.shape == (-(-out * cfg.bits // 32), G)
            zp_s = unpack(zp_words, cfg.bits, length=out, dim=0).long() - off
        gs = n // G
        w = (q_s - zp_s.repeat_interleave(gs, 1)) * scale.repeat_interleave(gs, 1)
        torch.testing.assert_close(w, l.dequantize().float(), rtol=0, atol=0)


def test_compressed_tensors_nvfp4_layout(tmp_path, tok):
    from calibra.ops._ref.quantize import e2m1_decode

    qm = Q.quantize(Q.tiny_llama(dtype=torch.bfloat16), tok, RTNConfig(bits=4, group_size=16, format="nvfp4"))
    p = E.export(qm, tmp_path / "o", "compressed-tensors")[0]
    qc = json.loads((p / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized"
    t = _load(p)
    for name, l in qm.layers.items():
        out, n = l.codes.shape
        packed = t[f"{name}.weight_packed"]
        assert packed.dtype == torch.uint8 and packed.shape == (out, n // 2)
        codes = torch.stack([packed & 0xF, packed >> 4], -1).reshape(out, n)  # low nibble = even index
        scale = t[f"{name}.weight_scale"]
        assert scale.dtype == torch.float8_e4m3fn and scale.shape == (out, n // 16)
        gscale = t[f"{name}.weight_global_scale"]
        w = e2m1_decode(codes) * (scale.float().repeat_interleave(16, 1) / gscale.float())
        torch.testing.assert_close(w.to(torch.bfloat16), l.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("sym", [True, False])
def test_mlx_layout(tmp_path, tok, sym):
    from safetensors import safe_open

    qm = Q.quantize(Q.tiny_llama(), tok, RTNConfig(bits=4, group_size=32, sym=sym))
    p = E.export(qm, tmp_path / "o", "mlx")[0]
    cfg = json.loads((p / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    shard = next(p.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        assert f.metadata() == {"format": "mlx"}
    t = _load(p)
    assert "lm_head.scales" not in t and t["lm_head.weight"].dtype == torch.float32
    for name, l in qm.layers.items():
        out, n = l.codes.shape
        wq = t[f"{name}.weight"]
        assert wq.dtype == torch.uint32 and wq.shape == (out, n // 8)
        words = wq.view(torch.int32)
        q = torch.stack([(words >> (4 * j)) & 0xF for j in range(8)], -1).reshape(out, n).float()  # LSB first
        s, b = t[f"{name}.scales"].repeat_interleave(32, 1), t[f"{name}.biases"].repeat_interleave(32, 1)
        torch.testing.assert_close(q * s + b, l.dequantize().float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qtype,bound", [("q8_0", 1e-4), ("q4_0", 0.03)])
def test_gguf_layout(tmp_path, tok, qtype, bound):
    import gguf  # in the test extra: a missing gguf is a failure, not a skip

    from calibra.export.gguf import gguf_name, permute_qk

    model = Q.tiny_llama()
    qm = Q.quantize(model, tok, RTNConfig(bits=4, group_size=32, sym=True))
    p = E.export(qm, tmp_path / "o", f"gguf-{qtype}")[0]
    r = gguf.GGUFReader(str(p / f"model-{qtype}.gguf"))
    tensors = {t.name: t for t in r.tensors}
    cfg = model.config
    assert len(tensors) == 2 + 1 + 9 * cfg.num_hidden_layers  # embd, out_norm, output + 9 per block
    tok_field = r.fields["tokenizer.ggml.tokens"]
    assert len(tok_field.data) == Q.VOCAB
    for name, l in qm.layers.items():
        key = gguf_name(f"{name}.weight")
        t = tensors[key]
        assert t.tensor_type.name == qtype.upper()
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(l.codes.shape)
        ref = l.dense().float()
        if key.endswith("attn_q.weight"):
            ref = permute_qk(ref, cfg.num_attention_heads)
        elif key.endswith("attn_k.weight"):
            ref = permute_qk(ref, cfg.num_key_value_heads)
        nmse = float(((w - ref) ** 2).sum() / (ref**2).sum())
        assert nmse < bound, (key, nmse)
    man = json.loads((p / "calibra_manifest.json").read_text())
    assert man["checkpoint"]["requantized"] is True and 0 < man["checkpoint"]["requant_nmse"] < bound


def test_permute_qk_matches_rope_pairs():
    """After the permutation, rows (2i, 2i+1) of a head are HF's rows (i, i + d/2): llama.cpp rotates
    adjacent pairs, HF rotates halves."""
    from calibra.export.gguf import permute_qk

    heads, d = 2, 8
    w = torch.arange(heads * d, dtype=torch.float32)[:, None].repeat(1, 3)
    p = permute_qk(w, heads)
    for h in range(heads):
        for i in range(d // 2):
            assert p[h * d + 2 * i, 0] == h * d + i and p[h * d + 2 * i + 1, 0] == h * d + i + d // 2
