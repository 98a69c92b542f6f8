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


def _solve(w, config, name, seed):
    if isinstance(config, GPTQConfig):
        h, n = Q._hessian(w.shape[1], seed)
        return gptq_quantize(w, h, n, config, name=name)
    return rtn_quantize(w, config, name=name)


def quantize(model, tok, config, *, source: str, seed: int = 0, experts: bool = True) -> QuantizedModel:
    """Quantize every target of every decoder layer in place (``experts=False``: leave the fused experts
    dense). Fused experts the adapter does not list (a layout it keeps dense) are quantized slice by
    slice under the same names ``calibra.quant.apply`` gives them."""
    from calibra.compat.transformers import is_fused_experts
    from calibra.models import get_adapter
    from calibra.quant.apply import layer_targets

    adapter = get_adapter(model)
    layers = {}
    for i, layer in enumerate(adapter.layers):
        for j, t in enumerate(layer_targets(adapter, i, layer)):
            if t.expert and not experts:
                continue
            w = t.weight()
            ql = _solve(w, config, t.name, seed + 100 * i + j)
            t.store(ql.dense().to(w.dtype))
            layers[t.name] = ql
    for path, mod in model.named_modules() if experts else ():
        if not is_fused_experts(mod):
            continue
        for e in range(mod.gate_up_proj.shape[0]):
            for j, proj in enumerate(("gate_up_proj", "down_proj")):
                name, param = f"{path}.{e}.{proj}", getattr(mod, proj)
                if name not in layers:
                    layers[name] = ql = _solve(param.data[e], config, name, seed + 7 * e + j)
                    param.data[e].copy_(ql.dense())
    return QuantizedModel(
        model=model, tokenizer=tok, layers=layers, config=config, source=source, report={"seed": seed}
    )
