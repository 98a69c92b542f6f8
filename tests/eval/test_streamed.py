"""Layer-by-layer evaluation (calibra.eval.streamed): the same numbers as the whole model, one layer in memory."""

from __future__ import annotations

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


def test_auto_streams_only_when_the_model_does_not_fit(monkeypatch, streamed_calls, capsys):
    import calibra.rss

    monkeypatch.setattr(calibra.rss, "proc_kib", lambda path, field: 1 << 20)  # 1 MiB available
    calibra.evaluate(SPEC, **PROTOCOL)
    assert streamed_calls["passes"] == 1
    assert "evaluating it layer by layer" in capsys.readouterr().err
    monkeypatch.setattr(calibra.rss, "proc_kib", lambda path, field: 1 << 40)
    calibra.evaluate(SPEC, **PROTOCOL)
    assert streamed_calls["passes"] == 1


def test_a_checkpoint_that_cannot_stream_is_named_or_loaded_whole(monkeypatch, capsys):
    """tiny-moe stores its experts one by one and transformers fuses them at load time: forced streaming
    says so before a weight is read; automatic streaming falls back to the whole model."""
    import calibra.rss

    with pytest.raises(ValueError, match="cannot be evaluated layer by layer: .*named or fused differently"):
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
