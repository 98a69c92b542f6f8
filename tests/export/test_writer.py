"""The shared writer: atomic folder, --overwrite, stale temp folders, sharding, manifest
verification, identical bytes for identical inputs, and the refusals (FAULTS rows 9, 12, 23, 25-27)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import calibra.export as E
from calibra.quant import GPTQConfig, MRGPTQConfig, RTNConfig
from tests.export import _qmodel as Q


@pytest.fixture(scope="module")
def tok():
    return Q.tokenizer()


@pytest.fixture(scope="module")
def qm(tok):
    return Q.quantize(Q.tiny_llama(), tok, RTNConfig(bits=4, group_size=32, sym=True))


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_hf_folder_contents(tmp_path, qm):
    p = E.export(qm, tmp_path / "ct", "compressed-tensors")[0]
    names = set(_tree(p))
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "calibra_manifest.json",
        "model.safetensors.index.json",
        "model-00001-of-00001.safetensors",
    } <= names
    card = (p / "README.md").read_text()
    assert card.startswith('---\nbase_model: "test:tiny-llama"\nlibrary_name: transformers\n')
    assert '- "compressed-tensors"' in card and "quant_group_size: 32" in card
    man = json.loads((p / "calibra_manifest.json").read_text())
    assert man["seed"] == 0 and man["settings"]["bits"] == 4 and man["settings"]["method"] == "rtn"
    assert set(man["files"]) == names - {"calibra_manifest.json"}
    assert {"calibra", "torch", "transformers", "safetensors"} <= set(man["versions"])
    assert not [x for x in os.listdir(tmp_path) if "calibra-tmp" in x]


def test_identical_bytes_for_identical_inputs(tmp_path, tok):
    """Two independent quantize + export runs with the same inputs give byte-identical folders."""
    a = E.export(
        Q.quantize(Q.tiny_llama(), tok, RTNConfig(bits=4, group_size=32)),
        tmp_path / "a",
        ["compressed-tensors", "gptq", "mlx", "dense"],
    )
    E.export(
        Q.quantize(Q.tiny_llama(), tok, RTNConfig(bits=4, group_size=32)),
        tmp_path / "b",
        "compressed-tensors,gptq,mlx,dense",
    )
    assert [p.name for p in a] == ["compressed-tensors", "gptq", "mlx", "dense"]
    ta, tb = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert len(ta) == 4 * 8 + 1 and ta == tb  # gptq adds quantize_config.json
    c = E.export(Q.quantize(Q.tiny_llama(seed=1), tok, RTNConfig(bits=4, group_size=32)), tmp_path / "c", "gptq")
    assert _tree(c[0]) != _tree(a[1])  # the property is not vacuous


def test_existing_output_refused_then_overwritten(tmp_path, qm):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        E.export(qm, out, "dense")
    assert (out / "keep.txt").read_text() == "old"
    E.export(qm, out, "dense", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()  # replaced whole
    assert sorted(os.listdir(tmp_path)) == ["o"]


def test_failure_mid_write_leaves_nothing(tmp_path, qm, monkeypatch):
    """A failure after some files are written (here: the manifest step, also a disk-full OSError) leaves
    no final folder, no temp folder, and an earlier output intact."""
    out = tmp_path / "o"
    E.export(qm, out, "dense")
    before = _tree(out)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(E, "write_manifest", boom)
    with pytest.raises(OSError, match="temporary output was removed"):
        E.export(qm, out, "gptq", overwrite=True)
    with pytest.raises(OSError):
        E.export(qm, tmp_path / "new", "gptq")
    assert _tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["o"]

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "write_manifest", interrupt)
    with pytest.raises(KeyboardInterrupt):
        E.export(qm, tmp_path / "new", "mlx")
    assert sorted(os.listdir(tmp_path)) == ["o"]


def test_stale_temp_folder_of_a_killed_run_is_removed(tmp_path, qm):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".o.calibra-tmp-{pid}"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    alive = tmp_path / f".o.calibra-tmp-{os.getppid()}"  # a live process's temp folder is left alone
    alive.mkdir()
    E.export(qm, tmp_path / "o", "dense")
    assert not stale.exists() and alive.exists() and (tmp_path / "o" / "config.json").is_file()


def test_manifest_verify_detects_a_flipped_byte(tmp_path, qm):
    from calibra.export.inspect import inspect

    p = E.export(qm, tmp_path / "o", "compressed-tensors")[0]
    assert E.verify_manifest(p) == [] and inspect(p, verify=True)["verified"] is True
    shard = p / "model-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = E.verify_manifest(p)
    assert problems == ["model-00001-of-00001.safetensors: sha256 differs from the manifest (file changed or corrupt)"]
    (p / "tokenizer.json").unlink()
    assert "tokenizer.json: missing" in E.verify_manifest(p)


def test_sharding_and_index_load_in_transformers(tmp_path, qm):
    from transformers import AutoModelForCausalLM

    p = E.export(qm, tmp_path / "o", "dense", max_shard_bytes=40_000)[0]
    shards = sorted(p.glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 3 and [s.name for s in shards] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    idx = json.loads((p / "model.safetensors.index.json").read_text())
    total = sum(t.numel() * t.element_size() for t in qm.model.state_dict().values())
    assert idx["metadata"]["total_size"] == total and set(idx["weight_map"].values()) == {s.name for s in shards}
    m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    x = Q.ids()
    assert torch.equal(Q.logits(m, x), Q.logits(qm.model, x))


def test_tied_embeddings_dense_roundtrip(tmp_path, tok):
    """FAULTS row 9: a tied lm_head is not written twice, and the reload is still tied and equal."""
    from transformers import AutoModelForCausalLM

    qm = Q.quantize(Q.tiny_llama(tie=True), tok, RTNConfig(bits=4, group_size=32))
    p = E.export(qm, tmp_path / "o", ["dense", "compressed-tensors"])
    idx = json.loads((p[0] / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in idx["weight_map"]
    for folder in p:
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
        assert torch.equal(Q.logits(m, Q.ids()), Q.logits(qm.model, Q.ids()))


def test_refusals(tmp_path, tok, qm):
    x = tmp_path / "x"
    with pytest.raises(ValueError, match="unknown format 'onnx'; choose from compressed-tensors, gptq"):
        E.export(qm, x, "gptq,onnx")
    act = Q.quantize(Q.tiny_llama(), tok, GPTQConfig(bits=4, group_size=32, desc_act=True))
    for fmt in ("compressed-tensors", "mlx"):
        with pytest.raises(E.ExportError, match="act-order.*static_groups=True"):
            E.export(act, x, fmt)
    mr = Q.quantize(Q.tiny_llama(), tok, MRGPTQConfig(format="nvfp4", choose=False))  # every Linear rotated
    for fmt in ("compressed-tensors", "gptq", "mlx", "gguf-q4_0"):
        with pytest.raises(E.ExportError, match="cannot express MR-GPTQ's Hadamard rotation.*Export 'dense'"):
            E.export(mr, x, fmt)
    nv = Q.quantize(Q.tiny_llama(), tok, RTNConfig(bits=4, group_size=16, format="nvfp4"))
    with pytest.raises(E.ExportError, match="gptq holds integer codes only"):
        E.export(nv, x, "gptq")
    g16 = Q.quantize(Q.tiny_llama(), tok, RTNConfig(bits=4, group_size=16))
    with pytest.raises(E.ExportError, match="mlx group_size must be 32, 64 or 128"):
        E.export(g16, x, "mlx")
    # a refusal in the second format writes nothing for the first either
    with pytest.raises(E.ExportError):
        E.export(act, x, "gptq,compressed-tensors")
    assert not x.exists() and os.listdir(tmp_path) == []
    # the rotated model still exports dense, computing exactly what calibra simulated
    from transformers import AutoModelForCausalLM

    p = E.export(mr, tmp_path / "d", "dense")[0]
    m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    assert torch.equal(Q.logits(m, Q.ids()), Q.logits(mr.model, Q.ids()))


def test_gguf_refuses_other_architectures(tmp_path, tok):
    import gguf  # noqa: F401 -- in the test extra: a missing gguf is a failure, not a skip
    import transformers as tf

    cfg = tf.Qwen2Config(
        vocab_size=Q.VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    qm = Q.quantize(model, tok, RTNConfig(bits=4, group_size=32))
    with pytest.raises(E.ExportError, match="llama architecture only, the model is 'qwen2'"):
        E.export(qm, tmp_path / "x", "gguf-q8_0")


def test_moe_experts(tmp_path, tok):
    """Fused experts: dense export writes transformers' per-expert names and reloads equal; an engine
    format refuses a fused tensor only some of whose experts are quantized (it stores each whole;
    fully quantized experts: test_moe_export.py)."""
    import transformers as tf
    from transformers import AutoModelForCausalLM

    from calibra.quant import rtn_quantize
    from calibra.quant.model import QuantizedModel

    cfg = tf.MixtralConfig(
        vocab_size=Q.VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=2,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ex = model.model.layers[0].mlp.experts
    ql = rtn_quantize(
        ex.down_proj.data[1], RTNConfig(bits=4, group_size=32), name="model.layers.0.mlp.experts.1.down_proj"
    )
    ex.down_proj.data[1] = ql.dense()
    qm = QuantizedModel(
        model=model,
        tokenizer=tok,
        layers={ql.name: ql},
        config=RTNConfig(bits=4, group_size=32),
        source="test:tiny-moe",
    )
    with pytest.raises(E.ExportError, match=r"1 of 2 experts are quantized \(expert 0 is not\)"):
        E.export(qm, tmp_path / "x", "compressed-tensors")
    p = E.export(qm, tmp_path / "d", "dense")[0]
    idx = json.loads((p / "model.safetensors.index.json").read_text())
    assert "model.layers.0.block_sparse_moe.experts.1.w2.weight" in idx["weight_map"]
    m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    assert torch.equal(Q.logits(m, Q.ids()), Q.logits(model, Q.ids()))
