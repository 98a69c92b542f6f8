"""GPTQ checkpoints (``quant_method: gptq``; transformers + optimum + gptqmodel, GPTQModel, vLLM).

Per quantized Linear (``W [out, in]``, FORMATS.md section 1):

- ``qweight`` int32 ``[in*bits/32, out]`` = ``pack(codes.T, bits, dim=0)`` (packed along the input dim);
- ``qzeros`` int32 ``[G, out*bits/32]`` = ``pack(zeros.T - offset, bits, dim=1)``;
- ``scales`` float16 ``[G, out]`` (GPTQ kernels read fp16 whatever the model dtype);
- ``g_idx`` int32 ``[in]``: each input column's group (act-order writes its permuted assignment).

Checkpoint format: symmetric models are written as v1 (``checkpoint_format: gptq``, the most
compatible), whose qzeros hold ``zero - 1`` (symmetric 4-bit: every word 0x77777777); asymmetric
models as ``gptq_v2``, whose qzeros hold the real zero (v1 would store zero 0 as -1, which wraps, and
GPTQModel.load refuses v1 asymmetric). The label always matches the zeros: a v2 file labelled
``gptq`` loads and computes garbage (vllm-project/vllm #38966).

The fp16 scales round calibra's scales once (float32/bfloat16 models), so a GPTQ export differs from
the simulated model by that rounding; a scale beyond fp16's range is refused.
Refused: non-int layers, bits other than 2/3/4/8, widths not divisible by 32, MR-GPTQ rotations.
Fused MoE experts are written per expert under the checkpoint's names (``calibra.export.experts``):
``experts.<e>.w1.qweight`` etc., the layout vLLM's GPTQ MoE loaders and GPTQModel's model definitions read.
"""

from __future__ import annotations

import torch

from calibra.export import _common, experts
from calibra.export.writer import ExportError, write_json
from calibra.ops import pack

NAME = "gptq"
WRITES_EXPERTS = True  # fused MoE experts, per expert (export/experts.py)
_BITS = (2, 3, 4, 8)


def width_problem(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why a Linear of this shape cannot be written, or None: GPTQ kernels (and qweight/qzeros' int32
    packing) need in_features and out_features divisible by 32, so a ragged last group (in_features not a
    multiple of the group) never reaches them unless the group is below 32; such layers are kept dense.
    A ragged group in widths that are multiples of 32 (in 192, group 128) is kept dense too: AutoGPTQ's
    layout sizes scales by ceil(in / group), but no GPTQ engine here proves such a file reloads."""
    if out_features % 32 or in_features % 32:
        return f"[out, in] = [{out_features}, {in_features}]: gptq kernels need both divisible by 32"
    return _common.ragged_group(out_features, in_features, group_size)


def check(qmodel) -> None:
    _common.refuse_rotation(qmodel, NAME)
    fmt, bits, gs, sym = _common.uniform(qmodel, NAME)
    if fmt != "int":
        raise ExportError(
            f"[export] {NAME} holds integer codes only, the model is quantized to {fmt}; export "
            f"'compressed-tensors' (nvfp4) or 'dense'"
        )
    if bits not in _BITS:
        raise ExportError(
            f"[export] {NAME} supports bits {_BITS}, the model has {bits}-bit layers; use "
            f"'compressed-tensors' or re-quantize"
        )
    bad = [  # the Linears as written: fused MoE experts cut per expert (export/experts.py)
        f"{n} {tuple(l.codes.shape)}"
        for n, l in experts.disk_layers(qmodel)
        if l.codes.shape[0] % 32 or l.codes.shape[1] % 32
    ]
    if bad:
        raise ExportError(
            f"[export] {NAME} kernels need in_features and out_features divisible by 32; "
            f"{len(bad)} layer(s) are not: {', '.join(bad[:5])}; quantize with --export {NAME} (those layers are "
            f"then kept dense, recorded in report.json), or use another format"
        )
    _common.refuse_widths(qmodel, NAME, _common.ragged_group)
    for n, l in qmodel.layers.items():
        if not bool(torch.isfinite(l.scales.to(torch.float16)).all()):
            raise ExportError(
                f"[export] {NAME} stores float16 scales, layer {n} has a scale beyond float16's "
                f"range ({float(l.scales.float().abs().max()):.3g}); use 'compressed-tensors'"
            )


def checkpoint_format(qmodel) -> str:
    return "gptq" if _common.uniform(qmodel, NAME)[3] else "gptq_v2"


def g_idx(l) -> torch.Tensor:
    n = l.codes.shape[1]
    if l.g_idx is not None:
        return l.g_idx.to(torch.int32)
    gs = n if l.group_size == -1 else l.group_size
    return (torch.arange(n) // gs).to(torch.int32)


def layer_tensors(name: str, l, ckpt: str) -> dict[str, torch.Tensor]:
    offset = 1 if ckpt == "gptq" else 0
    zeros = l.zeros.T.to(torch.int16) - offset
    if bool((zeros < 0).any()):  # cannot happen for symmetric (zero = 2^(bits-1)); guards the v1 rule
        raise ExportError(f"[export] {NAME} v1 cannot store zero point 0 (layer {name}); use gptq_v2")
    return {
        f"{name}.qweight": pack(l.codes.T, l.bits, dim=0),
        f"{name}.qzeros": pack(zeros.to(torch.uint8), l.bits, dim=1),
        f"{name}.scales": l.scales.T.to(torch.float16),
        f"{name}.g_idx": g_idx(l),
    }


def quantize_config(qmodel) -> dict:
    import calibra

    fmt, bits, gs, sym = _common.uniform(qmodel, NAME)
    cfg = qmodel.config
    desc_act = any(not _common.trivial_g_idx(l) for l in qmodel.layers.values()) or bool(
        getattr(cfg, "desc_act", False)
    )
    damp = getattr(cfg, "damp_percent", 0.01)
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": gs,
        "desc_act": desc_act,
        "sym": sym,
        "true_sequential": bool(getattr(cfg, "true_sequential", True)),
        "damp_percent": damp,
        "static_groups": bool(getattr(cfg, "static_groups", False)),
        "lm_head": "lm_head" in qmodel.layers,
        "pack_dtype": "int32",
        "checkpoint_format": checkpoint_format(qmodel),
        "meta": {"quantizer": [f"calibra:{calibra.__version__}"], "method": getattr(cfg, "method", "gptq")},
    }


def tensors(qmodel) -> dict[str, torch.Tensor]:
    ckpt = checkpoint_format(qmodel)
    out = _common.dense_state(qmodel, skip=_common.quantized_weight_keys(qmodel) | experts.fused_keys(qmodel))
    for name, l in experts.disk_layers(qmodel):
        out.update(layer_tensors(name, l, ckpt))
    return out


def write(qmodel, folder, *, max_shard_bytes=None) -> dict:
    check(qmodel)
    qc = quantize_config(qmodel)
    label = f"int{qc['bits']} {'sym' if qc['sym'] else 'asym'} g{qc['group_size']}" + (
        ", act-order" if qc["desc_act"] else ""
    )
    body = (
        f"Quantized with calibra ({label}); GPTQ checkpoint, `checkpoint_format: {qc['checkpoint_format']}`.\n\n"
        f"Load with `transformers` (needs `optimum` and `gptqmodel`) or `GPTQModel.load`."
    )
    _common.write_hf_folder(
        folder,
        qmodel,
        tensors(qmodel),
        config_updates={"quantization_config": qc},
        card={
            "title": f"{qmodel.source} ({label}, GPTQ)",
            "library_name": "transformers",
            "tags": ["gptq", f"{qc['bits']}-bit", "calibra"],
            "settings": _common.base_card_settings(qmodel, NAME),
            "body": body,
        },
        max_shard_bytes=max_shard_bytes,
    )
    write_json(folder / "quantize_config.json", qc)
    return {
        "checkpoint": {
            "format": qc["checkpoint_format"],
            "bits": qc["bits"],
            "group_size": qc["group_size"],
            "symmetric": qc["sym"],
            "desc_act": qc["desc_act"],
        }
    }
