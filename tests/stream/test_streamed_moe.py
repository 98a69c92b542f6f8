"""Streaming transformers-5 MoE checkpoints: on disk one tensor per expert and projection (Mixtral's
``block_sparse_moe.experts.<e>.w1``, Qwen3-MoE's ``mlp.experts.<e>.gate_proj``), in memory fused 3-D
parameters (``mlp.experts.gate_up_proj [E, 2I, H]``). The streamed reader learns where each parameter is
once per model (``calibra.io.disk_layout``), fills the fused experts from their per-expert tensors, and the
streamed quantize job writes exactly the whole-model job's tensors -- in calibra's folder and as
compressed-tensors -- on builtin:tiny-moe (Mixtral) and on a tiny Qwen3-MoE saved by transformers itself
(sharded, one dense-MLP layer). A missing, non-finite or truncated expert tensor fails naming it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import calibra  # noqa: E402
from calibra.assets import resolve_model  # noqa: E402
from calibra.data import CalibrationConfig  # noqa: E402
from calibra.io.streamed import StreamedModel  # noqa: E402
from calibra.quant import GPTQConfig, RTNConfig  # noqa: E402


def _open(folder):
    from calibra.io import inspect_model
    from calibra.io.streamed import open_streamed

    cfg = transformers.AutoConfig.from_pretrained(folder)
    weights, why = open_streamed(inspect_model(str(folder)), cfg, torch.float32)
    assert why is None, why
    return weights


def test_layout_is_learned_once_per_pattern_and_matches_each_layer(moe_folder, monkeypatch):
    from calibra.compat import transformers as compat

    calls = []
    real = compat.fused_expert_layout
    monkeypatch.setattr(compat, "fused_expert_layout", lambda m, k: (calls.append(k), real(m, k))[1])
    weights = _open(moe_folder)
    fused = {n: s for n, s in weights.layout.sources.items() if not isinstance(s, str)}
    assert len(fused) >= 4 and len(calls) == 2  # two probes (gate_up, down), not one per layer
    monkeypatch.setattr(compat, "fused_expert_layout", real)
    for name, src in fused.items():  # the re-indexed probe is what the conversion says of this layer
        direct = real(weights.model, name)
        assert sorted((p.expert, p.tensor, p.r0, p.r1) for p in src.pieces) == sorted(
            (e, f"{d}.weight", r0, r1) for e, cut in direct.items() for d, r0, r1 in cut
        ), name
    renamed = {n: s for n, s in weights.layout.sources.items() if isinstance(s, str)}
    if "tiny-moe" in str(moe_folder):  # Mixtral: the router is block_sparse_moe.gate on disk
        assert renamed["model.layers.2.mlp.gate.weight"] == "model.layers.2.block_sparse_moe.gate.weight"


def test_streamed_load_fills_the_fused_experts_as_from_pretrained(moe_folder):
    whole = transformers.AutoModelForCausalLM.from_pretrained(moe_folder, dtype=torch.float32)
    ref = dict(whole.named_parameters())
    weights = _open(moe_folder)
    layers = weights.model.model.layers
    for layer in layers:
        weights.load(layer)
        pre = weights._prefix(layer)
        for n, p in layer.named_parameters():
            assert torch.equal(p, ref[pre + n]), pre + n
        weights.release(layer)
    name = "model.layers.1.mlp.experts.gate_up_proj"  # the identity hash reads only the first values
    assert torch.equal(weights.first_values(name, 300), ref[name].reshape(-1)[:300])


def _cal():
    return CalibrationConfig(num_samples=8, sequence_length=64, seed=0)


def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("export", [None, "compressed-tensors"])
def test_streamed_moe_quantize_writes_the_whole_model_tensors(moe_folder, method, export, tmp_path):
    cfg = RTNConfig(bits=4, group_size=128) if method == "rtn" else GPTQConfig(bits=4, group_size=128)
    kw = dict(evaluate=False, progress=False, echo=None, export=export)
    _, whole = calibra.quantize(str(moe_folder), cfg, _cal(), output=tmp_path / "whole", stream=False, **kw)
    _, rep = calibra.quantize(str(moe_folder), cfg, _cal(), output=tmp_path / "streamed", stream=True, **kw)
    assert rep["plan"]["placement"].startswith("streamed") and "streaming" not in whole
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert set(a) == set(b)
    experts = [k for k in a if ".experts." in k]
    assert experts and any(k.startswith(("model.layers.1.block_sparse", "model.layers.1.mlp.experts.1")) for k in a)
    for k in a:
        if a[k].dtype == b[k].dtype:
            assert torch.equal(a[k], b[k]), k
        else:  # dense tensors: float32 in the whole-model job (its compute dtype), stored bf16 when streamed
            assert b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k].float()), k
    assert [m["module"] for m in whole["modules"]] == [m["module"] for m in rep["modules"]]
    assert rep.get("moe_coverage") == whole.get("moe_coverage")
    assert (rep.get("moe_coverage") is not None) == (method == "gptq")  # routing statistics when calibrating
    if export:  # the routers listed dense under their checkpoint names, as the whole-model export lists them
        qc = [
            json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in ("whole", "streamed")
        ]
        assert qc[0] == qc[1] and any(n.endswith(".gate") for n in qc[0]["ignore"])
    assert not calibra.export.verify_manifest(tmp_path / "streamed")


def test_streamed_moe_evaluation_reads_the_quantized_experts_back(tmp_path):
    """The streamed job measures its written folder layer by layer: the fused experts are assembled from
    the quantized slices, so the numbers are the whole-model job's."""
    kw = dict(evaluate=True, progress=False, echo=None)
    _, whole = calibra.quantize("builtin:tiny-moe", RTNConfig(bits=4), output=tmp_path / "w", stream=False, **kw)
    _, rep = calibra.quantize("builtin:tiny-moe", RTNConfig(bits=4), output=tmp_path / "s", stream=True, **kw)
    assert rep["eval"]["perplexity"]["compressed"] == pytest.approx(whole["eval"]["perplexity"]["compressed"], rel=1e-6)
    assert rep["eval"]["perplexity"]["compressed"] != rep["eval"]["perplexity"]["baseline"]


# ---------------------------------------------------------------------------------------- faults
VICTIM = "model.layers.1.block_sparse_moe.experts.2.w3.weight"


def _rewrite(folder, change=None, drop=False, last=False):
    """tiny-moe's single shard rewritten: ``VICTIM`` changed, dropped, or placed last in the file."""
    from safetensors.torch import load_file

    path = folder / "model.safetensors"
    t = load_file(str(path))
    if drop:
        del t[VICTIM]
    if change is not None:
        t[VICTIM] = change(t[VICTIM])
    names = sorted(t, key=lambda n: (last and n == VICTIM, n))
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for n in names:
        raw = t[n].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        header[n] = {"dtype": "BF16", "shape": list(t[n].shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


@pytest.fixture
def moe_copy(tmp_path):
    src = tmp_path / "model"
    shutil.copytree(resolve_model("builtin:tiny-moe"), src)
    return src


def _stream(src, out):
    return calibra.quantize(
        str(src), RTNConfig(bits=4), output=out, evaluate=False, stream=True, progress=False, echo=None
    )


def test_missing_expert_tensor_is_named_before_any_read(moe_copy, tmp_path, monkeypatch):
    from calibra.io import streamed

    _rewrite(moe_copy, drop=True)
    monkeypatch.setattr(streamed.WeightStore, "read", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(ValueError, match=VICTIM.replace(".", r"\.")):
        _stream(moe_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nonfinite_expert_tensor_is_named(moe_copy, tmp_path):
    from calibra.io import ModelReadError

    def poison(w):
        w = w.clone()
        w[3, 5] = float("nan")
        return w

    _rewrite(moe_copy, change=poison)
    with pytest.raises(ModelReadError, match=VICTIM.replace(".", r"\.") + ".*NaN"):
        _stream(moe_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_expert_tensor_truncated_mid_job_is_named_and_nothing_is_written(moe_copy, tmp_path, monkeypatch):
    from calibra.io import CorruptShardError
    from calibra.io.safetensors_header import read_header

    _rewrite(moe_copy, last=True)
    shard = moe_copy / "model.safetensors"
    header = read_header(shard)
    cut = 8 + header.header_size + header.tensors[VICTIM].begin + 10
    real_load = StreamedModel.load

    def truncate_then_load(self, module, *a, **k):  # sound when the job starts, cut short once it runs
        if shard.stat().st_size > cut:
            with open(shard, "r+b") as f:
                f.truncate(cut)
        return real_load(self, module, *a, **k)

    monkeypatch.setattr(StreamedModel, "load", truncate_then_load)
    with pytest.raises(CorruptShardError, match=VICTIM.replace(".", r"\.")):
        _stream(moe_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_streamed_moe_resume_keeps_the_routing_statistics(tmp_path, interrupt_after_layer):
    """A streamed GPTQ job on tiny-moe killed after layer 1's commit resumes byte-identical, and its report's
    MoE coverage still covers the finished layers (their routing statistics are committed with them)."""

    from .test_streamed_quantize import _files

    kw = dict(evaluate=False, progress=False, echo=None, stream=True, export="compressed-tensors")
    cfg = GPTQConfig(bits=4, group_size=128)
    _, ref = calibra.quantize("builtin:tiny-moe", cfg, _cal(), output=tmp_path / "ref", **kw)
    interrupt_after_layer(lambda: calibra.quantize("builtin:tiny-moe", cfg, _cal(), output=tmp_path / "out", **kw))
    _, rep = calibra.quantize("builtin:tiny-moe", cfg, _cal(), output=tmp_path / "out", resume=True, **kw)
    assert rep["resumed_from_layer"] == 2
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
    assert rep["moe_coverage"] == ref["moe_coverage"] and ref["moe_coverage"]
