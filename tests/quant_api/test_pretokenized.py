"""calibra.quantize on pre-tokenized calibration: ``(input_ids, attention_mask)`` and a
``TokenizedCalibration`` give exactly the codes the equivalent ``CalibrationConfig`` gives (the path
benchmarks/vs_llmcompressor.py relies on to feed both tools the same token ids)."""

from __future__ import annotations

import pytest
import torch

import calibra
from calibra.assets import load_model
from calibra.data import CalibrationConfig, CalibrationDataset, tokenize_calibration
from calibra.quant import GPTQConfig

from .conftest import CAL_KW

CFG = GPTQConfig(bits=4, group_size=32, true_sequential=False)


def _codes(qm):
    return {name: ql.codes.clone() for name, ql in qm.layers.items()}


def _quantize(folder, calibration, **kw):
    return calibra.quantize(str(folder), CFG, calibration, evaluate=False, progress=False, echo=None, **kw)


@pytest.fixture(scope="module")
def reference(llama_folder):
    qm, rep = _quantize(llama_folder, CalibrationConfig(**CAL_KW))
    _, tok = load_model(str(llama_folder))
    data = tokenize_calibration(CalibrationDataset.from_source("builtin"), tok, CalibrationConfig(**CAL_KW))
    return _codes(qm), data


def test_tensor_pair_equals_config(llama_folder, reference):
    codes, data = reference
    qm, rep = _quantize(llama_folder, (data.input_ids.clone(), data.attention_mask.to(torch.int8)))
    assert rep["settings"]["calibration"]["dataset"] == "tensors"
    assert rep["settings"]["calibration"]["tokens"] == data.token_count
    got = _codes(qm)
    assert got.keys() == codes.keys()
    for name in codes:
        assert torch.equal(got[name], codes[name]), name


def test_tokenized_calibration_equals_config(llama_folder, reference):
    codes, data = reference
    qm, rep = _quantize(llama_folder, data)
    assert rep["settings"]["calibration"]["fingerprint"] == data.fingerprint
    got = _codes(qm)
    for name in codes:
        assert torch.equal(got[name], codes[name]), name


def test_mask_none_means_all_real(llama_folder, reference):
    codes, data = reference
    assert bool(data.attention_mask.all())  # concat packing: no padding in this sample
    qm, _ = _quantize(llama_folder, (data.input_ids, None))
    got = _codes(qm)
    for name in codes:
        assert torch.equal(got[name], codes[name]), name
