"""Real-client round trip in CI: transformers 5.23 + compressed-tensors 0.20 load calibra's
compressed-tensors exports with AutoModelForCausalLM.from_pretrained, and the logits equal those of
calibra's simulated quantized model.

Tolerance: max |logits - simulated| <= 1e-3 in float32 (int) and <= 1e-3 in bfloat16 (nvfp4, which
compressed-tensors decompresses in bfloat16). Both decompress to the very same weights, so the
measured difference is 0.0; the bound leaves room for kernel differences between torch builds.
Asymmetric pack-quantized is not loadable by transformers 5.23 (FORMATS.md 2.6, a
weight_zero_point shape regression); its layout is checked in test_layouts.py and its real-client
load runs in the optional lane (transformers 5.17 + compressed-tensors 0.19).
"""

from __future__ import annotations

import pytest
import torch

import calibra.export as E
from calibra.quant import GPTQConfig, RTNConfig
from tests.export import _qmodel as Q

pytest.importorskip("compressed_tensors")
TOL = 1e-3


@pytest.fixture(scope="module")
def tok():
    return Q.tokenizer()


def _roundtrip(tmp_path, qm, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    p = E.export(qm, tmp_path / "ct", "compressed-tensors")[0]
    loaded = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    x = Q.ids()
    ref = Q.logits(qm.model, x)
    diff = float((Q.logits(loaded, x) - ref).abs().max())
    # the export is not the unquantized model: quantization itself moved the logits by far more
    return diff, ref


@pytest.mark.parametrize(
    "cfg,kw",
    [
        (RTNConfig(bits=4, group_size=32, sym=True), {}),
        (RTNConfig(bits=4, group_size=128, sym=True), {"hidden": 128, "inter": 256}),
        (RTNConfig(bits=8, group_size=-1, sym=True), {}),
        (GPTQConfig(bits=4, group_size=32, sym=True), {}),
    ],
    ids=["int4-g32", "int4-g128", "int8-channel", "gptq-int4-g32"],
)
def test_int_sym_loads_and_matches(tmp_path, tok, cfg, kw):
    model = Q.tiny_llama(**kw)
    x = Q.ids()
    dense_logits = Q.logits(model, x)
    qm = Q.quantize(model, tok, cfg)
    diff, ref = _roundtrip(tmp_path, qm)
    assert diff <= TOL, diff
    assert float((ref - dense_logits).abs().max()) > 100 * TOL  # quantization is visible: the check can fail


def test_nvfp4_loads_and_matches(tmp_path, tok):
    qm = Q.quantize(Q.tiny_llama(dtype=torch.bfloat16), tok, RTNConfig(bits=4, group_size=16, format="nvfp4"))
    diff, _ = _roundtrip(tmp_path, qm, dtype=torch.bfloat16)
    assert diff <= TOL, diff


def test_builtin_tiny_llama(tmp_path):
    got = Q.builtin_llama()
    if got is None:
        pytest.skip("builtin:tiny-llama is not installed (python/calibra/assets/models/tiny-llama)")
    model, tok = got
    qm = Q.quantize(model, tok, RTNConfig(bits=4, group_size=32, sym=True), source="builtin:tiny-llama")
    diff, _ = _roundtrip(tmp_path, qm)
    assert diff <= TOL, diff
