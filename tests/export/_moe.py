"""Tiny quantized MoE models for the export tests: a seeded random model of an MoE family (Mixtral,
Qwen2-MoE, Qwen3-MoE; ``tests.matrix.tiny_configs`` shrinks transformers' own config classes), experts
fused in memory as transformers 5 holds them, every weight calibra quantizes -- attention, shared
experts, each expert's ``gate_up_proj`` / ``down_proj`` slice -- quantized with calibra's own target list
(``calibra.quant.apply.layer_targets``) by RTN or GPTQ, and written back as its effective weight."""

from __future__ import annotations

import torch

from calibra.quant import GPTQConfig, gptq_quantize, rtn_quantize
from calibra.quant.model import QuantizedModel
from tests.export import _qmodel as Q

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def tiny_moe(model_type: str, dtype=torch.float32):
    from tests.matrix.tiny_configs import tiny_model

    model = tiny_model(model_type)
    return model.to(dtype) if dtype != torch.float32 else model


def quantize(model, tok, config, *, source: str, seed: int = 0) -> QuantizedModel:
    """Quantize every target of every decoder layer (fused experts included) in place."""
    from calibra.models import get_adapter
    from calibra.quant.apply import layer_targets

    adapter = get_adapter(model)
    layers = {}
    for i, layer in enumerate(adapter.layers):
        for j, t in enumerate(layer_targets(adapter, i, layer)):
            w = t.weight()
            if isinstance(config, GPTQConfig):
                h, n = Q._hessian(w.shape[1], seed + 100 * i + j)
                ql = gptq_quantize(w, h, n, config, name=t.name)
            else:
                ql = rtn_quantize(w, config, name=t.name)
            t.store(ql.dense().to(w.dtype))
            layers[t.name] = ql
    return QuantizedModel(
        model=model, tokenizer=tok, layers=layers, config=config, source=source, report={"seed": seed}
    )
