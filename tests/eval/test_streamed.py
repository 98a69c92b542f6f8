"""Layer-by-layer evaluation (calibra.eval.streamed): the same numbers as the whole model, one layer in memory."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import calibra  # noqa: E402
from calibra.eval import streamed as streamed_mod  # noqa: E402
from calibra.io.streamed import StreamedModel  # noqa: E402

SPEC = "builtin:tiny-llama"
PROTOCOL = dict(max_tokens=1536, seq_len=256, progress=False)


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


@pytest.fixture
def streamed_calls(monkeypatch):
    """Counts the layer-by-layer passes and the decoder layers loaded at once (the memory property)."""
    seen = {"passes": 0, "loaded": set(), "max_loaded": 0}
    run = streamed_mod.StreamedLM.iter_scored

    def counting_run(self, *a, **k):
        seen["passes"] += 1
        yield from run(self, *a, **k)

    load, release = StreamedModel.load, StreamedModel.release

    def counting_load(self, module, device=None):
        load(self, module, device)
        if module in list(self.model.model.layers):
            seen["loaded"].add(id(module))
            seen["max_loaded"] = max(seen["max_loaded"], len(seen["loaded"]))

    def counting_release(self, module):
        release(self, module)
        seen["loaded"].discard(id(module))

    monkeypatch.setattr(streamed_mod.StreamedLM, "iter_scored", counting_run)
    monkeypatch.setattr(StreamedModel, "load", counting_load)
    monkeypatch.setattr(StreamedModel, "release", counting_release)
    return seen


def test_streamed_perplexity_equals_the_whole_model(streamed_calls):
    whole = calibra.evaluate(SPEC, stream=False, **PROTOCOL)
    assert streamed_calls["passes"] == 0
    layered = calibra.evaluate(SPEC, stream=True, **PROTOCOL)
    assert streamed_calls["passes"] == 1
    assert streamed_calls["max_loaded"] == 1  # one decoder layer in memory at a time
    assert layered.tokens == whole.tokens and layered.windows == whole.windows
    assert _close(layered.ppl, whole.ppl), (layered.ppl, whole.ppl)


def test_streamed_kl_of_a_quantized_folder(tmp_path, streamed_calls):
    """calibra's quantized folder (the sharded layout a streamed job writes) read and dequantized layer by
    layer, against the unquantized model also streamed: the KL and both perplexities of the whole models."""
    from calibra.quant import RTNConfig

    out = tmp_path / "q"
    calibra.quantize(
        SPEC, RTNConfig(bits=3, group_size=32), output=out, stream=True, evaluate=False, progress=False, echo=None
    )
    kl = dict(metric="kl-divergence", reference=SPEC, **PROTOCOL)
    whole = calibra.evaluate(str(out), stream=False, **kl)
    layered = calibra.evaluate(str(out), stream=True, **kl)
    assert streamed_calls["passes"] == 2  # the reference, then the quantized model
    assert whole.kl_ref_cmp["mean"] > 1e-4  # 3-bit RTN: a real difference to measure
    assert _close(layered.kl_ref_cmp["mean"], whole.kl_ref_cmp["mean"], 1e-4)
    assert _close(layered.ppl_compressed, whole.ppl_compressed)
    assert _close(layered.ppl_reference, whole.ppl_reference)


@pytest.fixture(scope="module")
def ct_exports(tmp_path_factory):
    """The same RTN quantizations written as calibra's folder and as compressed-tensors exports."""
    from calibra.quant import RTNConfig

    root = tmp_path_factory.mktemp("ct")
    cfgs = {
        "int4-sym": RTNConfig(bits=4, group_size=32),
        "int4-asym": RTNConfig(bits=4, group_size=32, sym=False),
        "int8-channel": RTNConfig(bits=8, group_size=-1),
        "nvfp4": RTNConfig(bits=4, group_size=16, format="nvfp4"),
    }
    out = {}
    for name, cfg in cfgs.items():
        for export in (None, "compressed-tensors"):
            folder = root / f"{name}-{export or 'calibra'}"
            calibra.quantize(SPEC, cfg, output=folder, export=export, evaluate=False, progress=False, echo=None)
            out[name, export] = str(folder)
    return out


@pytest.mark.parametrize("scheme", ["int4-sym", "int4-asym", "int8-channel", "nvfp4"])
def test_streamed_compressed_tensors_export_equals_calibras_folder(ct_exports, scheme, streamed_calls):
    """A compressed-tensors export read layer by layer (its packed codes, zero points and FP8 scales
    dequantized as each layer loads) is the model calibra's own folder holds: the same perplexity."""
    from calibra.quant.streamed_load import CompressedTensorsStore

    seen = []
    read = CompressedTensorsStore.layer

    def counting(self, module):
        seen.append(module)
        return read(self, module)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CompressedTensorsStore, "layer", counting)
        ct = calibra.evaluate(ct_exports[scheme, "compressed-tensors"], stream=True, **PROTOCOL)
    assert any(m.endswith("mlp.down_proj") for m in seen)  # the export's packed tensors were read
    own = calibra.evaluate(ct_exports[scheme, None], stream=True, **PROTOCOL)
    assert streamed_calls["max_loaded"] == 1
    assert _close(ct.ppl, own.ppl, 1e-6), (ct.ppl, own.ppl)
    unquantized = calibra.evaluate(SPEC, stream=False, **PROTOCOL)
    assert not _close(ct.ppl, unquantized.ppl, 1e-4)  # the check can fail: quantization moved it


def test_streamed_compressed_tensors_export_equals_transformers_loading_it(ct_exports):
    """The symmetric int4 export (which transformers + compressed-tensors load on the CPU): layer by layer
    and whole through the engine's own decompression give the same perplexity."""
    spec = ct_exports["int4-sym", "compressed-tensors"]
    whole = calibra.evaluate(spec, stream=False, **PROTOCOL)
    layered = calibra.evaluate(spec, stream=True, **PROTOCOL)
    assert _close(layered.ppl, whole.ppl), (layered.ppl, whole.ppl)


@pytest.mark.parametrize("scheme", ["int4-asym", "nvfp4"])
def test_exports_transformers_cannot_load_in_float32_stream_by_default(ct_exports, scheme, streamed_calls, capsys):
    """NVFP4 (compressed-tensors decompresses to bf16 only) and asymmetric int (transformers rejects its
    zero points): `calibra eval` without --stream reads them layer by layer instead of failing."""
    r = calibra.evaluate(ct_exports[scheme, "compressed-tensors"], **PROTOCOL)
    assert streamed_calls["passes"] == 1 and math.isfinite(r.ppl)
    assert "evaluating it layer by layer" in capsys.readouterr().err


def test_compressed_tensors_schemes_it_cannot_rebuild_are_refused(ct_exports, tmp_path, monkeypatch):
    """An export with activation quantization (say) is refused before a weight is read, naming why."""
    import shutil

    from calibra.io import streamed

    spec = tmp_path / "w8a8"
    shutil.copytree(ct_exports["int4-sym", "compressed-tensors"], spec)
    cfg = json.loads((spec / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    (spec / "config.json").write_text(json.dumps(cfg))

    def boom(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(streamed.WeightStore, "read", boom)
    with pytest.raises(ValueError, match="quantizes activations.*--no-stream"):
        calibra.evaluate(str(spec), stream=True, **PROTOCOL)


def test_auto_streams_only_when_the_model_does_not_fit(monkeypatch, streamed_calls, capsys):
    import calibra.rss

    monkeypatch.setattr(calibra.rss, "proc_kib", lambda path, field: 1 << 20)  # 1 MiB available
    calibra.evaluate(SPEC, **PROTOCOL)
    assert streamed_calls["passes"] == 1
    assert "evaluating it layer by layer" in capsys.readouterr().err
    monkeypatch.setattr(calibra.rss, "proc_kib", lambda path, field: 1 << 40)
    calibra.evaluate(SPEC, **PROTOCOL)
    assert streamed_calls["passes"] == 1


def test_moe_checkpoint_streams_layer_by_layer(streamed_calls):
    """tiny-moe stores its experts one by one and transformers fuses them at load time: the streamed reader
    fills the fused experts from the per-expert tensors (calibra.io.disk_layout), so the layer-by-layer
    perplexity is the whole model's."""
    whole = calibra.evaluate("builtin:tiny-moe", stream=False, **PROTOCOL)
    layered = calibra.evaluate("builtin:tiny-moe", stream=True, **PROTOCOL)
    assert streamed_calls["passes"] == 1 and streamed_calls["max_loaded"] == 1
    assert _close(layered.ppl, whole.ppl), (layered.ppl, whole.ppl)


def test_a_checkpoint_that_cannot_stream_is_named_or_loaded_whole(monkeypatch, capsys):
    """A layout the reader cannot invert tensor by tensor (here: the fused-expert conversion reported as a
    transposing one, as for GPT-OSS): forced streaming says so before a weight is read; automatic streaming
    falls back to the whole model."""
    import calibra.rss
    from calibra.io import disk_layout

    def transposing(model, name, param):
        if name.endswith("gate_up_proj"):
            raise ValueError(f"transformers saves the fused experts {name} transposed")
        return real(model, name, param)

    real = disk_layout._probe
    monkeypatch.setattr(disk_layout, "_probe", transposing)
    with pytest.raises(ValueError, match="cannot be evaluated layer by layer: .*cannot read back tensor by tensor"):
        calibra.evaluate("builtin:tiny-moe", stream=True, **PROTOCOL)
    monkeypatch.setattr(calibra.rss, "proc_kib", lambda path, field: 1 << 20)
    r = calibra.evaluate("builtin:tiny-moe", **PROTOCOL)
    assert math.isfinite(r.ppl)
    assert "loading it whole instead" in capsys.readouterr().err


def test_attribution_refuses_a_streamed_model_before_reading_weights(monkeypatch):
    def no_read(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(streamed_mod.StreamedLM, "iter_scored", no_read)
    with pytest.raises(ValueError, match="attribution .* layer by layer"):
        calibra.evaluate(SPEC, reference=SPEC, attribution=True, stream=True, **PROTOCOL)


def test_cli_stream_flag(tmp_path, streamed_calls):
    from calibra.cli import main

    js = tmp_path / "r.json"
    assert (
        main(["eval", "--model", SPEC, "--stream", "--max-tokens", "1024", "--seq-len", "256", "--json", str(js)]) == 0
    )
    assert streamed_calls["passes"] == 1
    assert js.is_file()
