"""The streamed job (``stream=True``: the model read one decoder layer at a time from its shards, the result
written layer by layer) gives exactly the whole-model job's quantized tensors, keeps dense tensors at their
stored dtype, refuses what it cannot do before reading a weight, and leaves nothing at the output path when a
shard turns out truncated in the middle of the job."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

import calibra  # noqa: E402
from calibra.data import CalibrationConfig  # noqa: E402
from calibra.io.streamed import StreamedModel  # noqa: E402
from calibra.quant import GPTQConfig, RTNConfig  # noqa: E402


def _cal():
    return CalibrationConfig(num_samples=8, sequence_length=64, seed=0)


def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _quantize(out, cfg, **kw):
    return calibra.quantize(
        "builtin:tiny-llama", cfg, _cal(), output=out, evaluate=False, progress=False, echo=None, **kw
    )


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("export", [None, "compressed-tensors"])
def test_streamed_equals_whole_model(method, export, tmp_path, monkeypatch):
    cfg = RTNConfig(bits=4, group_size=32) if method == "rtn" else GPTQConfig(bits=4, group_size=32)
    loads = []
    orig = StreamedModel.load
    monkeypatch.setattr(StreamedModel, "load", lambda self, m, *a, **k: (loads.append(m), orig(self, m, *a, **k)))
    _, whole = _quantize(tmp_path / "whole", cfg, export=export)
    assert not loads and "streaming" not in whole
    _, rep = _quantize(tmp_path / "streamed", cfg, export=export, stream=True)
    assert rep["plan"]["placement"].startswith("streamed") and len(loads) >= 4  # every layer loaded on its own
    assert rep["streaming"]["bytes_read"] > 0
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "streamed")
    assert set(a) == set(b)
    for k in a:
        if a[k].dtype == b[k].dtype:
            assert torch.equal(a[k], b[k]), k
        else:  # dense tensors: float32 in the whole-model job (its compute dtype), stored bf16 when streamed
            assert b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k].float()), k
    index = json.loads(next((tmp_path / "streamed").glob("*.safetensors.index.json")).read_text())
    assert len(set(index["weight_map"].values())) >= 5  # one shard per layer, then the rest
    assert [m["module"] for m in whole["modules"]] == [m["module"] for m in rep["modules"]]
    assert not calibra.export.verify_manifest(tmp_path / "streamed")


def test_streamed_folder_loads_back(tmp_path):
    from calibra.quant.save import load

    _quantize(tmp_path / "whole", GPTQConfig(bits=4, group_size=32))
    _quantize(tmp_path / "streamed", GPTQConfig(bits=4, group_size=32), stream=True)
    ma, _ = load(tmp_path / "whole")
    mb, _ = load(tmp_path / "streamed")
    ids = torch.randint(0, 4000, (1, 24))
    assert torch.equal(ma(ids).logits, mb(ids).logits)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(output=None), "output=DIR"),
        (dict(export="gptq"), "compressed-tensors"),
        (dict(config=None, scheme="fp8"), "--stream"),
        (dict(config=None, scheme="fp8-dynamic"), "--stream"),
        (dict(config=None, scheme="w8a8"), "--stream"),
        (dict(kv_cache="fp8"), "--stream"),
        (dict(awq=True), "AWQ"),
    ],
    ids=["no-output", "gptq-format", "scheme-fp8", "scheme-fp8-dynamic", "scheme-w8a8", "kv-cache", "awq"],
)
def test_streamed_refusals_come_before_any_read(kw, needle, tmp_path, monkeypatch):
    from calibra.io import streamed

    def boom(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(streamed.WeightStore, "read", boom)
    args = dict(output=tmp_path / "out", evaluate=False, stream=True, config=GPTQConfig(bits=4))
    args.update(kw)
    cfg = args.pop("config")
    if args.pop("awq", False):
        cfg = GPTQConfig(bits=4, awq=True)
    with pytest.raises(ValueError, match="stream") as e:
        calibra.quantize("builtin:tiny-llama", cfg, _cal(), progress=False, echo=None, **args)
    assert needle in str(e.value)
    assert not (tmp_path / "out").exists()


def test_truncated_shard_mid_job_names_the_tensor_and_writes_nothing(tmp_path, monkeypatch):
    from calibra.assets import resolve_model
    from calibra.io import CorruptShardError
    from calibra.io.model_reader import inspect_model

    src = tmp_path / "model"
    shutil.copytree(resolve_model("builtin:tiny-llama"), src)
    inspect_model(str(src))  # the folder is sound when the job starts ...
    shard = src / "model.safetensors"
    from calibra.io.safetensors_header import read_header

    header = read_header(shard)
    layer_tensors = [n for n in header.tensors if n.startswith("model.layers.")]
    victim = max(layer_tensors, key=lambda n: header.tensors[n].begin)  # the last one in the file
    cut = 8 + header.header_size + header.tensors[victim].begin + 10
    real_load = StreamedModel.load

    def truncate_then_load(self, module, *a, **k):  # ... and is cut short once the job is running
        if shard.stat().st_size > cut:
            with open(shard, "r+b") as f:
                f.truncate(cut)
        return real_load(self, module, *a, **k)

    monkeypatch.setattr(StreamedModel, "load", truncate_then_load)
    out = tmp_path / "out"
    with pytest.raises(CorruptShardError, match=victim.replace(".", r"\.")):
        calibra.quantize(
            str(src), RTNConfig(bits=4), output=out, evaluate=False, stream=True, progress=False, echo=None
        )
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_planner_streaming_does_not_grow_with_depth():
    from transformers import LlamaConfig

    from calibra.jobs.plan import plan_job

    def peak(layers):
        cfg = LlamaConfig(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=1000,
        )
        kw = dict(job="quantize", calibration=_resolved(cfg), device="cpu", solver="gptq", baseline_rss=0)
        return plan_job(cfg, streaming=True, **kw).peak_host, plan_job(cfg, **kw).peak_host

    (s4, w4), (s32, w32) = peak(4), peak(32)
    assert abs(s32 - s4) <= 1e-3 * s4 and w32 > 4 * w4 > s4  # streaming: flat in depth; whole model: grows


def _resolved(cfg):
    from calibra.data import resolve_config

    c, _ = resolve_config(_cal(), cfg, echo=lambda *a: None, print_estimate=False, observers=["hessian"])
    return c


def _files(folder):
    """Every file's bytes but the reports' (report.json and report.html carry timings)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in ("report.json", "report.html")}


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("commit", [True, False])
def test_streamed_resume_after_an_interrupt_is_byte_identical(method, commit, tmp_path, monkeypatch):
    """A streamed job interrupted after layer 1's shard was written -- with that layer committed, or killed
    just before its commit (the shard is on disk, uncommitted) -- resumes from its checkpoints (the shards
    in the work folder) and writes the same bytes as an uninterrupted streamed run."""
    from calibra.io import checkpoint

    cfg = RTNConfig(bits=4, group_size=32) if method == "rtn" else GPTQConfig(bits=4, group_size=32)
    _quantize(tmp_path / "ref", cfg, export="compressed-tensors", stream=True)

    real = checkpoint.LayerCheckpoints.save_layer

    def interrupted(self, i, *a, **k):
        if i == 1 and not commit:
            raise KeyboardInterrupt
        real(self, i, *a, **k)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.LayerCheckpoints, "save_layer", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _quantize(out, cfg, export="compressed-tensors", stream=True)
    work = checkpoint.work_dir(out)
    assert not out.exists() and (work / "output").is_dir()
    assert len(list((work / "output").glob(".part-*.safetensors"))) == 2  # layers 0 and 1 written
    monkeypatch.setattr(checkpoint.LayerCheckpoints, "save_layer", real)

    reads = []
    from calibra.io.streamed import WeightStore

    orig_read = WeightStore.read

    def read(self, name, count=None):
        if count is None:  # a whole tensor (model_identity reads the first 16 values of each)
            reads.append(name)
        return orig_read(self, name, count)

    monkeypatch.setattr(WeightStore, "read", read)
    _, rep = _quantize(out, cfg, export="compressed-tensors", stream=True, resume=True)
    assert rep["resumed_from_layer"] == (2 if commit else 1)
    assert not [n for n in reads if n.startswith("model.layers.0.")]  # finished layers are not read again
    assert _files(out) == _files(tmp_path / "ref")
    assert not work.exists()
    assert not calibra.export.verify_manifest(out)


def test_streamed_resume_refuses_a_whole_model_runs_checkpoints(tmp_path, monkeypatch):
    from calibra.io import checkpoint

    real = checkpoint.LayerCheckpoints.save_layer

    def interrupted(self, i, *a, **k):
        real(self, i, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.LayerCheckpoints, "save_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _quantize(tmp_path / "out", GPTQConfig(bits=4, group_size=32), stream=False)
    monkeypatch.setattr(checkpoint.LayerCheckpoints, "save_layer", real)
    with pytest.raises(checkpoint.ResumeError, match="streamed"):
        _quantize(tmp_path / "out", GPTQConfig(bits=4, group_size=32), stream=True, resume=True)


@pytest.mark.parametrize("export", [None, "compressed-tensors"], ids=["calibra-folder", "compressed-tensors"])
def test_streamed_job_evaluates_layer_by_layer_as_the_whole_model_does(export, tmp_path):
    """A streamed job's report carries the same evaluation as the whole-model job's: the reference and the
    quantized model are both run layer by layer (the quantized one from the finished folder: calibra's, or
    the compressed-tensors export read back as an engine dequantizes it)."""
    from calibra.eval import streamed as streamed_eval

    passes = []
    run = streamed_eval.StreamedLM.iter_scored

    def counting(self, *a, **k):
        passes.append(self.label)
        yield from run(self, *a, **k)

    kw = dict(evaluate=True, progress=False, echo=None, eval_max_tokens=1536, eval_seq_len=256, export=export)
    cfg = RTNConfig(bits=3, group_size=32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streamed_eval.StreamedLM, "iter_scored", counting)
        _, streamed = calibra.quantize("builtin:tiny-llama", cfg, output=tmp_path / "s", stream=True, **kw)
    assert passes == ["the unquantized model", "the quantized model"]
    _, whole = calibra.quantize("builtin:tiny-llama", cfg, output=tmp_path / "w", stream=False, **kw)
    a, b = streamed["eval"], whole["eval"]
    assert a["protocol"]["tokens_scored"] == b["protocol"]["tokens_scored"]
    assert b["kl_divergence"]["mean"] > 1e-4
    assert a["kl_divergence"]["mean"] == pytest.approx(b["kl_divergence"]["mean"], rel=1e-4)
    assert a["perplexity"]["compressed"] == pytest.approx(b["perplexity"]["compressed"], rel=1e-5)
    assert a["perplexity"]["baseline"] == pytest.approx(b["perplexity"]["baseline"], rel=1e-5)
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["eval"]["kl_divergence"]["mean"] == a["kl_divergence"]["mean"]


def test_streamed_compressed_tensors_of_swapped_experts_refused_before_any_read(tmp_path, monkeypatch):
    """Llama 4: a streamed job writes the tensors as stored (fused experts), which compressed-tensors cannot
    use (transformers swaps the experts for per-expert Linears on load): refused before any weight is read."""
    pytest.importorskip("transformers")
    from calibra.io import streamed
    from tests.matrix.run_one import _tokenizer
    from tests.matrix.tiny_configs import tiny_model

    model = tiny_model("llama4_text")
    model.save_pretrained(tmp_path / "m")
    _tokenizer(model.config.vocab_size).save_pretrained(tmp_path / "m")

    def boom(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(streamed.WeightStore, "read", boom)
    with pytest.raises(ValueError, match="per-expert Linears transformers swaps in"):
        calibra.quantize(
            str(tmp_path / "m"),
            GPTQConfig(bits=4, group_size=-1),
            CalibrationConfig(num_samples=2, sequence_length=16),
            output=tmp_path / "out",
            export="compressed-tensors",
            stream=True,
            evaluate=False,
            progress=False,
            echo=None,
        )
    assert not (tmp_path / "out").exists()
