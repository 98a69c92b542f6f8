"""RTN with activation ranges streamed from disk (``act_ranges=True`` or an ``activation_ranges.json`` with
``stream=True``): the ranges pass reads each layer from the shards and takes its ranges and SmoothQuant
factors while it is loaded, the quantization pass folds them into each layer as it loads, and the output
holds the whole-model job's quantized tensors and activation_ranges.json byte for byte, the folded norms
at the stored dtype; resumable byte-identical; a ranges file naming a module the model lacks is refused
before any weight is read."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import calibra  # noqa: E402
from calibra.data import CalibrationConfig  # noqa: E402
from calibra.quant import RTNConfig  # noqa: E402

from .test_streamed_quantize import _files, _tensors  # noqa: E402

CFG = RTNConfig(bits=4, group_size=32)


def _quantize(out, calibration=None, **kw):
    calibration = calibration or CalibrationConfig(num_samples=8, sequence_length=64, seed=0)
    return calibra.quantize(
        "builtin:tiny-llama", CFG, calibration, output=out, evaluate=False, progress=False, echo=None, **kw
    )


def _same_tensors(whole, streamed) -> list[str]:
    """Asserts the two folders hold the same tensors (the whole-model job's float32 dense tensors at the
    streamed one's stored bf16); returns the names of those that only agree once rounded to bf16."""
    a, b = _tensors(whole), _tensors(streamed)
    assert set(a) == set(b)
    rounded = []
    for k in a:
        if a[k].dtype == b[k].dtype:
            assert torch.equal(a[k], b[k]), k
        else:
            assert b[k].dtype == torch.bfloat16 and torch.equal(a[k].to(torch.bfloat16), b[k]), k
            if not torch.equal(a[k], b[k].float()):
                rounded.append(k)
    return rounded


@pytest.mark.parametrize("export", [None, "compressed-tensors"])
def test_streamed_act_ranges_equal_the_whole_model_job(export, tmp_path):
    _, whole = _quantize(tmp_path / "whole", act_ranges=True, export=export)
    _, rep = _quantize(tmp_path / "streamed", act_ranges=True, export=export, stream=True)
    assert rep["plan"]["placement"].startswith("streamed") and "activation ranges" in rep["plan"]["phases"]
    name = "activation_ranges.json"
    assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes()
    assert rep["activation_ranges"] == whole["activation_ranges"] and rep["activation_ranges"]["smoothed_modules"]
    assert rep["quantization"] == whole["quantization"]
    rounded = _same_tensors(tmp_path / "whole", tmp_path / "streamed")
    # the folded norms: changed by the smoothing (float32 in the whole-model job), written at the stored dtype
    norms = set(json.loads((tmp_path / "streamed" / name).read_text())["smooth_factor"])
    assert rounded and {k.removesuffix(".weight") for k in rounded} <= norms
    assert not calibra.export.verify_manifest(tmp_path / "streamed")


def test_streamed_rtn_with_a_ranges_file_equals_the_whole_model_job(tmp_path):
    _quantize(tmp_path / "ranges", act_ranges=True)
    ranges = tmp_path / "activation_ranges.json"
    ranges.write_bytes((tmp_path / "ranges" / "activation_ranges.json").read_bytes())
    _, whole = _quantize(tmp_path / "whole", calibration=str(ranges))
    _, rep = _quantize(tmp_path / "streamed", calibration=str(ranges), stream=True)
    assert rep["activation_ranges"] == whole["activation_ranges"] and rep["activation_ranges"]["source"] == str(ranges)
    _same_tensors(tmp_path / "whole", tmp_path / "streamed")


def test_ranges_file_naming_a_module_the_model_lacks_is_refused_before_any_read(tmp_path, monkeypatch):
    from calibra.io import streamed

    _quantize(tmp_path / "ranges", act_ranges=True)
    doc = json.loads((tmp_path / "ranges" / "activation_ranges.json").read_text())
    doc["smooth_factor"]["model.layers.99.input_layernorm"] = next(iter(doc["smooth_factor"].values()))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    monkeypatch.setattr(streamed.WeightStore, "read", lambda *a, **k: pytest.fail("a weight was read"))
    with pytest.raises(ValueError, match=r"model\.layers\.99\.input_layernorm.*lacks"):
        _quantize(tmp_path / "out", calibration=str(bad), stream=True)
    assert not (tmp_path / "out").exists()


def test_streamed_act_ranges_resume_is_byte_identical(tmp_path, interrupt_after_layer):
    """Interrupted after layer 1's commit, the job collects the ranges again (the same factors), folds them
    into the remaining layers and writes the bytes of an uninterrupted streamed run."""

    _quantize(tmp_path / "ref", act_ranges=True, stream=True)
    interrupt_after_layer(lambda: _quantize(tmp_path / "out", act_ranges=True, stream=True))
    _, rep = _quantize(tmp_path / "out", act_ranges=True, stream=True, resume=True)
    assert rep["resumed_from_layer"] == 2
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
