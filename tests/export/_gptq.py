"""A reader of calibra's GPTQ exports for the tests: unpacks qweight / qzeros / scales / g_idx with the
format's formulas (transformers' GPTQ path needs optimum + gptqmodel, not installed here), writes the
dequantized weights as a dense checkpoint under the export's own names (which transformers loads, re-fusing
MoE experts through its conversion mapping), and rounds calibra's scales to float16 as GPTQ does."""

from __future__ import annotations

import dataclasses
import json
import re

import torch
from safetensors.torch import load_file

from calibra.models.linear import store_weight
from calibra.ops import unpack


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def gptq_dequant(t, name, bits, v1):
    qweight, qzeros, scales, g_idx = (t[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
    n, out = g_idx.numel(), scales.shape[1]
    q = unpack(qweight, bits, length=n, dim=0).long()  # [in, out]
    z = unpack(qzeros, bits, length=out, dim=1).long() + (1 if v1 else 0)  # [G, out]
    g = g_idx.long()
    return (scales.float()[g] * (q - z[g])).T  # [out, in]


def half_scales(l):
    """calibra's dequantized weight with its scales rounded to float16 (GPTQ's one rounding)."""
    return dataclasses.replace(l, scales=l.scales.half().float()).dequantize().float()


def gptq_as_dense(folder, out_dir, bits, v1):
    """A dense checkpoint of the GPTQ export's dequantized weights, under the export's own names."""
    from safetensors.torch import save_file

    t = tensors(folder)
    dense = {k: v for k, v in t.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for k in t:
        if k.endswith(".qweight"):
            name = k[: -len(".qweight")]
            dense[f"{name}.weight"] = gptq_dequant(t, name, bits, v1).contiguous()
    out_dir.mkdir()
    save_file(dense, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("quantization_config")
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out_dir


def with_half_scales(qm):
    """calibra's simulated model with every quantized weight's scales rounded to float16 (GPTQ's rounding)."""
    for name, l in qm.layers.items():
        w = half_scales(l).to(l.weight.dtype)
        m = re.match(r"^(.+\.experts)\.(\d+)\.(gate_up_proj|down_proj)$", name)
        if m:  # an expert's slice of a fused parameter, in whichever layout the family keeps it
            from calibra.compat.transformers import experts_module, store_expert_slice

            store_expert_slice(experts_module(qm.model, m.group(1)), m.group(3), int(m.group(2)), w)
        else:  # nn.Linear or GPT-2's transposed Conv1D
            store_weight(qm.model.get_submodule(name), w)
    return qm.model
