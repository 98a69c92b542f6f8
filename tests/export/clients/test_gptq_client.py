"""GPTQ exports through transformers + optimum + gptqmodel (and GPTQModel.load), optional lane.

Tolerance: max |logits - simulated| <= 5% of max |logits| (float32 activations). GPTQ stores float16
scales, and gptqmodel's CPU kernel (TorchAtenLinear, aten's int4 CPU matmul) holds scales and zero
offsets in bfloat16, i.e. up to 2^-9 relative error per weight, which two layers of a model with
large activations turn into ~3% of the logit range. The quantization itself moves the logits far
more (asserted: 5x the measured difference), so a wrong zero-point convention (one quantization step
on every weight) fails.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")
pytest.importorskip("accelerate")

import calibra.export as E  # noqa: E402
from calibra.quant import GPTQConfig, RTNConfig  # noqa: E402
from tests.export import _qmodel as Q  # noqa: E402
from tests.export.clients._lane import max_diff, model_and_tokenizer, report  # noqa: E402

TOL_REL = 0.05
CASES = [
    ("v1-sym-int4-g32", RTNConfig(bits=4, group_size=32, sym=True)),
    ("v2-asym-int4-g32", RTNConfig(bits=4, group_size=32, sym=False)),
    ("v1-sym-actorder-g32", GPTQConfig(bits=4, group_size=32, sym=True, desc_act=True)),
    ("v2-asym-actorder-g32", GPTQConfig(bits=4, group_size=32, sym=False, desc_act=True)),
    ("v1-sym-int8-g64", RTNConfig(bits=8, group_size=64, sym=True)),
]


@pytest.mark.parametrize("case,cfg", CASES, ids=[c for c, _ in CASES])
def test_transformers_loads_gptq(tmp_path, case, cfg):
    from transformers import AutoModelForCausalLM

    model, tok, source = model_and_tokenizer()
    x = Q.ids()
    dense = Q.logits(model, x)
    qm = Q.quantize(model, tok, cfg, source=source)
    p = E.export(qm, tmp_path / "gptq", "gptq")[0]
    loaded = AutoModelForCausalLM.from_pretrained(p, device_map="cpu", dtype=torch.float32)
    ref = Q.logits(qm.model, x)
    diff = max_diff(Q.logits(loaded, x), ref)
    qerr = max_diff(ref, dense)
    tol = TOL_REL * float(ref.abs().max())
    report("transformers+gptqmodel", case, diff, tol, f"(quantization itself: {qerr:.3f})")
    assert diff <= tol and qerr > 5 * diff


@pytest.mark.parametrize("case,cfg", [CASES[0], CASES[1]], ids=[CASES[0][0], CASES[1][0]])
def test_gptqmodel_load(tmp_path, case, cfg):
    from gptqmodel import GPTQModel

    model, tok, source = model_and_tokenizer()
    x = Q.ids()
    qm = Q.quantize(model, tok, cfg, source=source)
    p = E.export(qm, tmp_path / "gptq", "gptq")[0]
    loaded = GPTQModel.load(str(p), device="cpu")
    with torch.no_grad():
        out = loaded.model(input_ids=x).logits.float()
    ref = Q.logits(qm.model, x)
    diff = max_diff(out, ref)
    tol = TOL_REL * float(ref.abs().max())
    report("GPTQModel.load", case, diff, tol)
    assert diff <= tol
