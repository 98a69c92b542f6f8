"""Asymmetric compressed-tensors through transformers 5.17 + compressed-tensors 0.19 (the llmcompressor
0.14.0.1 venv), optional lane. transformers 5.23 cannot load asymmetric pack-quantized (FORMATS.md 2.6),
so this runs only where transformers < 5.18. Tolerance: max |logits - simulated| <= 1e-3 in float32.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("compressed_tensors")
import transformers  # noqa: E402

if tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (5, 18):
    pytest.skip(f"transformers {transformers.__version__} has the asymmetric compressed-tensors load regression; "
                f"run in the llmc venv (transformers 5.17)", allow_module_level=True)

import calibra.export as E  # noqa: E402
from calibra.quant import GPTQConfig, RTNConfig  # noqa: E402
from tests.export import _qmodel as Q  # noqa: E402
from tests.export.clients._lane import max_diff, model_and_tokenizer, report  # noqa: E402

TOL = 1e-3


@pytest.mark.parametrize("case,cfg", [("int4-g32-asym", RTNConfig(bits=4, group_size=32, sym=False)),
                                      ("gptq-int4-g32-asym", GPTQConfig(bits=4, group_size=32, sym=False)),
                                      ("int8-channel-asym", RTNConfig(bits=8, group_size=-1, sym=False)),
                                      ("int4-g32-sym", RTNConfig(bits=4, group_size=32, sym=True))])
def test_transformers_517_loads_ct(tmp_path, case, cfg):
    from transformers import AutoModelForCausalLM

    model, tok, source = model_and_tokenizer()
    x = Q.ids()
    qm = Q.quantize(model, tok, cfg, source=source)
    p = E.export(qm, tmp_path / "ct", "compressed-tensors")[0]
    loaded = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    diff = max_diff(Q.logits(loaded, x), Q.logits(qm.model, x))
    report(f"transformers{transformers.__version__}+ct", case, diff, TOL)
    assert diff <= TOL
