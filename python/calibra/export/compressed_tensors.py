"""compressed-tensors checkpoints (vllm-project/compressed-tensors 0.20; transformers, vLLM):
``pack-quantized`` for int 2..8-bit layers and ``nvfp4-pack-quantized`` for NVFP4 layers.

Layout per quantized Linear (FORMATS.md section 2):

- int: ``weight_packed`` int32 ``[out, ceil(in*bits/32)]`` = ``pack(codes, bits)``; ``weight_scale``
  ``[out, G]`` in the model dtype; ``weight_shape`` int64 ``[2]``; asymmetric only:
  ``weight_zero_point`` int32 ``[ceil(out*bits/32), G]`` = ``pack(zeros, bits, dim=0)``.
- nvfp4: ``weight_packed`` uint8 ``[out, in/2]`` (even index in the low nibble), ``weight_scale``
  float8_e4m3fn ``[out, in/16]``, ``weight_global_scale`` float32 ``[1]`` (a divisor).

The zero-point convention (the trap of FORMATS 2.2): compressed-tensors computes with *signed*
codes ``q_s in [-2^(b-1), 2^(b-1) - 1]`` and signed zero points ``zp_s``, ``w = (q_s - zp_s) * scale``,
and stores both with ``+2^(b-1)``. calibra's unsigned codes and zeros are exactly those stored values
(``q = q_s + 2^(b-1)``, ``zero = zp_s + 2^(b-1)``), so the words are packed from ``codes``/``zeros``
directly, and the symmetric zero ``2^(b-1)`` is the signed zero 0 that the format omits. Never run an
unsigned zero through the signed packer (that adds the offset twice).

Refused (FAULTS row 12): act-order with dynamic groups (compressed-tensors removed ``actorder:
group``), MR-GPTQ rotations, MXFP4 layers (not verified here), fused MoE experts.
"""

from __future__ import annotations

import torch

from calibra.export import _common
from calibra.export.writer import ExportError
from calibra.ops import pack

NAME = "compressed-tensors"
CT_VERSION = "0.20.0"


def check(qmodel) -> None:
    _common.refuse_rotation(qmodel, NAME)
    _common.refuse_experts(qmodel, NAME)
    fmt, bits, gs, sym = _common.uniform(qmodel, NAME)
    if fmt not in ("int", "nvfp4"):
        raise ExportError(
            f"[export] {NAME}: {fmt} layers are not supported (int and nvfp4 are); use format "
            f"'mlx'/'dense', or quantize to nvfp4"
        )
    for name, l in qmodel.layers.items():
        if not _common.trivial_g_idx(l):
            raise ExportError(
                f"[export] {NAME} cannot express act-order with dynamic groups (layer {name} has a "
                f"permuted g_idx; compressed-tensors removed 'actorder: group'). Quantize with "
                f"desc_act=True, static_groups=True, or export 'gptq' (FAULTS row 12)"
            )


def scheme(qmodel) -> dict:
    fmt, bits, gs, sym = _common.uniform(qmodel, NAME)
    if fmt == "nvfp4":
        return {
            "format": "nvfp4-pack-quantized",
            "weights": {
                "num_bits": 4,
                "type": "float",
                "symmetric": True,
                "strategy": "tensor_group",
                "group_size": 16,
                "dynamic": False,
                "actorder": None,
                "block_structure": None,
                "observer": "static_minmax",
                "observer_kwargs": {},
                "scale_dtype": "torch.float8_e4m3fn",
                "zp_dtype": None,
            },
        }
    return {
        "format": "pack-quantized",
        "weights": {
            "num_bits": bits,
            "type": "int",
            "symmetric": sym,
            "strategy": "channel" if gs == -1 else "group",
            "group_size": None if gs == -1 else gs,
            "dynamic": False,
            "actorder": None,
            "block_structure": None,
            "observer": "minmax",
            "observer_kwargs": {},
            "scale_dtype": None,
            "zp_dtype": None,
        },
    }


def quantization_config(qmodel) -> dict:
    s = scheme(qmodel)
    quantized = set(qmodel.layers)
    ignore = [n for n in _common.linear_names(qmodel.model) if n not in quantized]
    return {
        "quant_method": "compressed-tensors",
        "format": s["format"],
        "quantization_status": "compressed",
        "version": CT_VERSION,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": s["format"],
                "weights": s["weights"],
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
    }


def layer_tensors(name: str, l) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one QuantizedLayer, keyed ``<name>.weight_*``."""
    if l.format == "nvfp4":
        return {
            f"{name}.weight_packed": pack(l.codes, 4, word=torch.uint8),
            f"{name}.weight_scale": l.scales,
            f"{name}.weight_global_scale": l.global_scale.float().reshape(1),
        }
    t = {
        f"{name}.weight_packed": pack(l.codes, l.bits),
        f"{name}.weight_scale": l.scales.to(l.weight.dtype),
        f"{name}.weight_shape": torch.tensor(list(l.codes.shape), dtype=torch.int64),
    }
    if not l.symmetric:
        t[f"{name}.weight_zero_point"] = pack(l.zeros, l.bits, dim=0)
    return t


def checked_layer_tensors(name: str, l) -> dict[str, torch.Tensor]:
    """:func:`layer_tensors` after :func:`check` of that one layer (a streamed job writes layer by layer)."""
    from types import SimpleNamespace

    check(SimpleNamespace(layers={name: l}))
    return layer_tensors(name, l)


def write_streamed_files(qmodel, folder) -> None:
    """Everything but the tensors (a streamed job wrote those): config, card, tokenizer, manifest."""
    from calibra.export.writer import write_manifest

    extra = write(qmodel, folder, tensors_written=True)
    write_manifest(folder, format=NAME, qmodel=qmodel, extra=extra)


def tensors(qmodel) -> dict[str, torch.Tensor]:
    out = _common.dense_state(qmodel, skip=_common.quantized_weight_keys(qmodel))
    for name, l in qmodel.layers.items():
        out.update(layer_tensors(name, l))
    return out


def write(qmodel, folder, *, max_shard_bytes=None, tensors_written: bool = False) -> dict:
    """The checkpoint in ``folder``; ``tensors_written``: the shards are already there (a streamed job
    wrote them layer by layer, ``calibra.export.streamed``), write the config, card and the rest."""
    if not tensors_written:
        check(qmodel)
    qc = quantization_config(qmodel)
    fmt, bits, gs, sym = _common.uniform(qmodel, NAME)
    label = "nvfp4" if fmt == "nvfp4" else f"int{bits} {'symmetric' if sym else 'asymmetric'}, group {gs}"
    body = (
        f"Quantized with calibra ({label}) and written as a compressed-tensors `{qc['format']}` checkpoint.\n\n"
        f"Load with `transformers` + `compressed-tensors`:\n\n```python\nfrom transformers import "
        f'AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("<this folder>")\n```\n\n'
        f"Left dense: {', '.join(qc['ignore']) or 'nothing'}."
    )
    if not sym and fmt == "int":
        body += (
            "\n\nNote: with transformers >= 5.18 and compressed-tensors 0.20, the default load of an "
            "asymmetric pack-quantized checkpoint fails on the shape of `weight_zero_point` (compressed-tensors "
            "does not pack the zero point of the empty model it builds first). Load it dequantized instead:\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, CompressedTensorsConfig\n"
            'model = AutoModelForCausalLM.from_pretrained("<this folder>", '
            "quantization_config=CompressedTensorsConfig(dequantize=True))\n```"
        )
    tags = ["compressed-tensors", "calibra", f"{bits}-bit" if fmt == "int" else "nvfp4"]
    _common.write_hf_folder(
        folder,
        qmodel,
        None if tensors_written else tensors(qmodel),
        config_updates={"quantization_config": qc},
        card={
            "title": f"{qmodel.source} ({label}, compressed-tensors)",
            "library_name": "transformers",
            "tags": tags,
            "settings": _common.base_card_settings(qmodel, NAME),
            "body": body,
        },
        max_shard_bytes=max_shard_bytes,
    )
    return {"checkpoint": {"format": qc["format"], "bits": bits, "group_size": gs, "symmetric": sym}}
