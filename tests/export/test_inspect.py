"""calibra inspect: format detection for every export, dense sparsity, the CLI and --verify."""

from __future__ import annotations

import json

import pytest
import torch

import calibra.export as E
from calibra.cli import main
from calibra.export.inspect import inspect
from calibra.quant import GPTQConfig, RTNConfig
from tests.export import _qmodel as Q


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tok = Q.tokenizer()
    root = tmp_path_factory.mktemp("inspect")
    out = {}
    qm = Q.quantize(Q.tiny_llama(), tok, RTNConfig(bits=4, group_size=32, sym=True))
    fmts = ["compressed-tensors", "gptq", "mlx", "dense"]
    try:
        import gguf  # noqa: F401

        fmts.append("gguf-q4_0")
    except ImportError:
        pass
    for p in E.export(qm, root / "sym", fmts):
        out[p.name] = p
    out["qm"] = qm
    asym = Q.quantize(Q.tiny_llama(), tok, GPTQConfig(bits=8, group_size=64, sym=False, desc_act=True))
    out["gptq-asym"] = E.export(asym, root / "asym", "gptq")[0]
    return out


def test_detects_each_format(exported):
    ct = inspect(exported["compressed-tensors"])
    assert (ct["format"], ct["bits"], ct["group_size"], ct["symmetric"]) == (
        "compressed-tensors/pack-quantized",
        4,
        32,
        True,
    )
    assert ct["producer"].startswith("calibra ") and ct["source"] == "test:tiny-llama"
    g = inspect(exported["gptq"])
    assert (g["format"], g["bits"], g["group_size"], g["desc_act"]) == ("gptq/gptq", 4, 32, False)
    g2 = inspect(exported["gptq-asym"])
    assert (g2["format"], g2["bits"], g2["symmetric"], g2["desc_act"]) == ("gptq/gptq_v2", 8, False, True)
    m = inspect(exported["mlx"])
    assert (m["format"], m["bits"], m["group_size"]) == ("mlx/affine", 4, 32)
    d = inspect(exported["dense"])
    ws = [l.dense() for l in exported["qm"].layers.values()]  # int4 codes at the zero point are exact zeros
    frac = sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)
    assert d["format"] == "dense" and d["architecture"] == "LlamaForCausalLM"
    assert 0.01 < frac and d["sparsity"] == pytest.approx(frac, abs=1e-12)
    assert d["bytes"] == sum(p.stat().st_size for p in exported["dense"].iterdir())
    if "gguf-q4_0" in exported:
        gg = inspect(exported["gguf-q4_0"])
        assert gg["format"] == "gguf" and gg["bits"] == 4 and gg["architecture"] == "llama"
        assert gg["tensor_types"]["Q4_0"] == 14


def test_dense_sparsity(tmp_path):
    """Half of every Linear weight zeroed (2:4-style) -> sparsity 0.5 over the Linear weights."""
    from calibra.quant.model import QuantizedModel

    model = Q.tiny_llama()
    with torch.no_grad():
        for n, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in n:
                mod.weight.view(-1, 4)[:, :2] = 0
    qm = QuantizedModel(model=model, tokenizer=None, layers={}, config={"method": "prune"}, source="test")
    p = E.export(qm, tmp_path / "d", "dense")[0]
    info = inspect(p)
    assert info["sparsity"] == pytest.approx(0.5) and info["linear_weights"] == 2 * (
        4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 128
    )


def test_cli_inspect_and_verify(exported, tmp_path, capsys):
    import shutil

    assert main(["inspect", str(exported["gptq"]), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "gptq/gptq" in text and "ok: every sha256 matches" in text
    bad = tmp_path / "bad"
    shutil.copytree(exported["mlx"], bad)
    cfg = bad / "config.json"
    cfg.write_text(cfg.read_text().replace('"bits": 4', '"bits": 8', 1))
    assert main(["inspect", str(bad), "--verify", "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] is False and info["problems"][0].startswith("config.json: ")
