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

- fp8 (``--scheme fp8`` / ``fp8-dynamic``, format ``float-quantized``): ``weight`` float8_e4m3fn
  ``[out, in]``, ``weight_scale`` ``[out, 1]`` in the model dtype; static activations add
  ``input_scale`` ``[1]`` (model dtype). The group's ``weights``/``input_activations`` are
  compressed-tensors' ``FP8_DYNAMIC`` preset, or its ``FP8`` preset with per-channel weights.
- int8 W8A8 (``--scheme w8a8`` / ``w8a8-static``, format ``int-quantized``, compressed-tensors'
  ``IntQuantizationCompressor``): ``weight`` int8 ``[out, in]`` = the signed codes ``codes - 128``,
  ``weight_scale`` ``[out, 1]`` in the model dtype (no zero point: symmetric); static activations add
  ``input_scale`` ``[1]``. The group's ``weights``/``input_activations`` are compressed-tensors' ``W8A8``
  preset (per-token dynamic inputs), or the same weights with static per-tensor int8 inputs.
- NVFP4 W4A4 (``--scheme nvfp4``, format ``nvfp4-pack-quantized``, compressed-tensors' ``NVFP4`` preset):
  the nvfp4 weight tensors above plus ``input_global_scale`` float32 ``[1]`` per Linear (448 * 6 / the
  calibrated input absmax; the per-16 input scales are computed at run time).
- MXFP4 W4A4 (``--scheme mxfp4``, format ``mxfp4-pack-quantized``, compressed-tensors' ``MXFP4`` preset):
  ``weight_packed`` uint8 ``[out, in/2]`` (as nvfp4), ``weight_scale`` uint8 ``[out, in/32]`` (E8M0: the
  exponent + 127); no global scale, dynamic inputs (nothing stored).
- ``--kv-cache fp8``: ``kv_cache_scheme`` (8-bit float, per tensor, static) and per attention module
  ``<layer>.self_attn.k_scale`` / ``v_scale`` ``[1]`` in the model dtype (compressed-tensors'
  ``initialize_attn_qparams``; the names vLLM reads).

Refused (FAULTS row 12): act-order with dynamic groups (compressed-tensors removed ``actorder:
group``), MR-GPTQ rotations, weight-only MXFP4 layers (only the W4A4 scheme's are written). Fused MoE
experts are written per expert under the checkpoint's names (``calibra.export.experts``), their routers
listed in ``ignore``.
"""

from __future__ import annotations

import torch

from calibra.export import _common, experts
from calibra.export.writer import ExportError
from calibra.ops import pack

NAME = "compressed-tensors"
WRITES_EXPERTS = True  # fused MoE experts, per expert (export/experts.py)
CT_VERSION = "0.20.0"


def width_problem(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why a Linear of this shape cannot be written with this group size, or None. compressed-tensors
    (0.20) sizes a ragged last group's scales (ceil) but its dequantization reshapes the weight into whole
    groups and raises ("tensor column shape must be divisible by the given group_size"), so transformers
    cannot load such a layer: it is kept dense (docs/export.md)."""
    return _common.ragged_group(out_features, in_features, group_size)


def check(qmodel) -> None:
    _common.refuse_rotation(qmodel, NAME)
    _common.refuse_widths(qmodel, NAME, width_problem)
    fused = experts.fused_keys(qmodel)  # fused MoE experts are written per expert (export/experts.py)
    if getattr(qmodel, "model", None) is not None:
        experts.swapped_on_load(qmodel)  # experts the loader swaps for Linears: refused when quantized
    fmt, bits, gs, sym = _common.uniform(qmodel, NAME)
    act_fmt = _input_format(qmodel)
    if fmt not in ("int", "nvfp4", "fp8") and not (fmt == "mxfp4" and act_fmt == "mxfp4"):
        raise ExportError(
            f"[export] {NAME}: {fmt} layers are not supported (int, nvfp4 and fp8 are, and mxfp4 with MXFP4 "
            f"inputs: --scheme mxfp4); use format 'mlx'/'dense', or quantize to nvfp4"
        )
    iq = getattr(qmodel, "input_quant", None)
    int8_w8a8 = act_fmt == "int8" and fmt == "int" and bits == 8 and sym and gs == -1
    fp4_w4a4 = act_fmt not in ("nvfp4", "mxfp4") or fmt == act_fmt
    if (fmt == "fp8") != (act_fmt == "fp8") or (act_fmt == "int8" and not int8_w8a8) or not fp4_w4a4:
        raise ExportError(
            f"[export] {NAME}: fp8 weights are written with fp8 inputs only (--scheme fp8 or fp8-dynamic), "
            f"int8 inputs with symmetric per-channel int8 weights only (--scheme w8a8), and FP4 inputs with "
            f"weights of the same FP4 format (--scheme nvfp4 / mxfp4); got {fmt} weights "
            f"({bits}-bit, group {gs}) and {act_fmt or 'no'} activation quantization"
        )
    if iq is not None:
        kinds = {(d.dynamic, d.format) for d in iq.values()}
        if len(kinds) != 1 or set(iq) != set(qmodel.layers):
            raise ExportError(
                f"[export] {NAME}: every quantized layer must share one activation scheme (static or dynamic)"
            )
        if fused:
            # transformers 5.25 loads fused experts dequantized and runs them on unquantized inputs, so the
            # checkpoint would compute something else than the simulation (|dlogits| 1e-2 on a tiny Mixtral)
            raise ExportError(
                f"[export] {NAME}: activation quantization of fused MoE experts is not exported (transformers "
                f"loads the experts dense and would run them without the input quantization); quantize "
                f"weight-only, or export 'dense'"
            )
    for name, l in qmodel.layers.items():
        if not _common.trivial_g_idx(l):
            raise ExportError(
                f"[export] {NAME} cannot express act-order with dynamic groups (layer {name} has a "
                f"permuted g_idx; compressed-tensors removed 'actorder: group'). Quantize with "
                f"desc_act=True, static_groups=True, or export 'gptq' (FAULTS row 12)"
            )


# compressed-tensors' own presets (quantization/quant_scheme.py: FP8_DYNAMIC, FP8), field for field;
# tests/export/test_ct_fp8.py compares them with the installed package's
FP8_WEIGHTS = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "group_size": None,
    "strategy": "channel",
    "dynamic": False,
}
FP8_INPUT_DYNAMIC = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "group_size": None,
    "strategy": "token",
    "dynamic": True,
}
FP8_INPUT_STATIC = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "group_size": None,
    "strategy": "tensor",
    "dynamic": False,
    "observer": "static_minmax",
}
FP8_KV_CACHE = {
    "num_bits": 8,
    "type": "float",
    "symmetric": True,
    "group_size": None,
    "strategy": "tensor",
    "dynamic": False,
}


# compressed-tensors' W8A8 preset (quantization/quant_scheme.py: INT8_W8A8), field for field; static
# inputs: the same arguments with one per-tensor scale (tests/quant_api/test_w8a8_scheme.py compares them)
INT8_WEIGHTS = {
    "num_bits": 8,
    "type": "int",
    "symmetric": True,
    "group_size": None,
    "strategy": "channel",
    "dynamic": False,
}
INT8_INPUT_DYNAMIC = {
    "num_bits": 8,
    "type": "int",
    "symmetric": True,
    "group_size": None,
    "strategy": "token",
    "dynamic": True,
}
INT8_INPUT_STATIC = {
    "num_bits": 8,
    "type": "int",
    "symmetric": True,
    "group_size": None,
    "strategy": "tensor",
    "dynamic": False,
}


# compressed-tensors' NVFP4 and MXFP4 (W4A4) presets (quantization/quant_scheme.py), field for field;
# tests/quant_api/test_fp4_schemes.py compares them with the installed package's
NVFP4_WEIGHTS = {
    "num_bits": 4,
    "type": "float",
    "symmetric": True,
    "group_size": 16,
    "strategy": "tensor_group",
    "dynamic": False,
    "scale_dtype": "torch.float8_e4m3fn",
    "zp_dtype": "torch.float8_e4m3fn",
}
NVFP4_INPUT = {
    "num_bits": 4,
    "type": "float",
    "symmetric": True,
    "group_size": 16,
    "strategy": "tensor_group",
    "dynamic": "local",
    "observer": "static_minmax",
    "scale_dtype": "torch.float8_e4m3fn",
    "zp_dtype": "torch.float8_e4m3fn",
}
MXFP4_WEIGHTS = {
    "num_bits": 4,
    "type": "float",
    "symmetric": True,
    "group_size": 32,
    "strategy": "group",
    "dynamic": False,
    "scale_dtype": "torch.uint8",
    "zp_dtype": "torch.uint8",
}
MXFP4_INPUT = dict(MXFP4_WEIGHTS, dynamic=True)


def _input_format(qmodel) -> str | None:
    """The format of the model's quantized inputs ("fp8", "int8"), or None (weight-only)."""
    iq = getattr(qmodel, "input_quant", None)
    return next(iter(iq.values())).format if iq else None


def scheme(qmodel) -> dict:
    fmt, bits, gs, sym = _common.uniform(qmodel, NAME)
    if _input_format(qmodel) == "nvfp4":
        return {
            "format": "nvfp4-pack-quantized",
            "weights": dict(NVFP4_WEIGHTS),
            "input_activations": dict(NVFP4_INPUT),
        }
    if _input_format(qmodel) == "mxfp4":
        return {
            "format": "mxfp4-pack-quantized",
            "weights": dict(MXFP4_WEIGHTS),
            "input_activations": dict(MXFP4_INPUT),
        }
    if _input_format(qmodel) == "int8":
        dynamic = next(iter(qmodel.input_quant.values())).dynamic
        return {
            "format": "int-quantized",
            "weights": dict(INT8_WEIGHTS),
            "input_activations": dict(INT8_INPUT_DYNAMIC if dynamic else INT8_INPUT_STATIC),
        }
    if fmt == "fp8":
        dynamic = next(iter(qmodel.input_quant.values())).dynamic
        return {
            "format": "float-quantized",
            "weights": dict(FP8_WEIGHTS),
            "input_activations": dict(FP8_INPUT_DYNAMIC if dynamic else FP8_INPUT_STATIC),
        }
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
    # MoE routers and unquantized fused experts, under their on-disk names (vLLM's MoE loaders read them)
    ignore += [n for n in experts.dense_names(qmodel) if n not in ignore]
    # experts transformers' loader swaps for per-expert Linears (Llama 4), written dense
    ignore += [n for n in experts.swapped_on_load(qmodel).modules if n not in ignore]
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
                "input_activations": s.get("input_activations"),
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": dict(FP8_KV_CACHE) if getattr(qmodel, "kv_scales", None) is not None else None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
    }


def layer_tensors(name: str, l, int_quantized: bool = False) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one QuantizedLayer, keyed ``<name>.weight_*``; ``int_quantized``:
    an int8 layer of a W8A8 model (unpacked signed int8 codes, the ``int-quantized`` format)."""
    if int_quantized:
        signed = (l.codes.to(torch.int16) - 128).to(torch.int8)  # calibra's unsigned code 128 is zero
        return {f"{name}.weight": signed, f"{name}.weight_scale": l.scales.to(l.weight.dtype)}
    if l.format == "fp8":
        return {f"{name}.weight": l.codes, f"{name}.weight_scale": l.scales.to(l.weight.dtype)}
    if l.format == "mxfp4":  # calibra's scale bytes are E8M0 already (2^(byte - 127))
        return {f"{name}.weight_packed": pack(l.codes, 4, word=torch.uint8), f"{name}.weight_scale": l.scales}
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
    out = _common.dense_state(qmodel, skip=_common.quantized_weight_keys(qmodel) | experts.fused_keys(qmodel))
    swapped = experts.swapped_on_load(qmodel)
    out = {k: v for k, v in out.items() if k not in swapped.drop} | swapped.tensors
    int_quantized = _input_format(qmodel) == "int8"
    for name, l in experts.disk_layers(qmodel):
        out.update(layer_tensors(name, l, int_quantized))
    for name, iq in (getattr(qmodel, "input_quant", None) or {}).items():
        if iq.format == "nvfp4":  # a divisor of the per-16 scales, float32 as compressed-tensors keeps it
            out[f"{name}.input_global_scale"] = iq.scale.reshape(1).float()
        elif not iq.dynamic:
            out[f"{name}.input_scale"] = iq.scale.reshape(1).to(qmodel.layers[name].weight.dtype)
    kv = getattr(qmodel, "kv_scales", None)
    if kv is not None:
        from calibra.models import get_adapter
        from calibra.quant.kv_fp8 import attention_path

        adapter = get_adapter(qmodel.model)
        dtype = next(qmodel.model.parameters()).dtype
        for i, (k, v) in kv.items():
            path = attention_path(adapter, i)
            out[f"{path}.k_scale"] = k.reshape(1).to(dtype)
            out[f"{path}.v_scale"] = v.reshape(1).to(dtype)
    return out


def write(qmodel, folder, *, max_shard_bytes=None, tensors_written: bool = False) -> dict:
    """The checkpoint in ``folder``; ``tensors_written``: the shards are already there (a streamed job
    wrote them layer by layer, ``calibra.export.streamed``), write the config, card and the rest."""
    if not tensors_written:
        check(qmodel)
    elif experts.swapped_on_load(qmodel).modules:  # the shards hold the stored (fused) tensors
        raise ExportError(
            f"[export] {NAME}: a streamed job wrote the experts as stored, but transformers loads them as "
            f"per-expert Linears; export compressed-tensors from calibra's folder"
        )
    qc = quantization_config(qmodel)
    fmt, bits, gs, sym = _common.uniform(qmodel, NAME)
    act_fmt = _input_format(qmodel)
    label = (
        f"{fmt} W4A4: {fmt} weights, {fmt} inputs"
        if act_fmt in ("nvfp4", "mxfp4")
        else "nvfp4"
        if fmt == "nvfp4"
        else f"{qmodel.scheme}: fp8 weights per channel, fp8 inputs"
        if fmt == "fp8"
        else f"{qmodel.scheme}: int8 weights per channel, int8 inputs"
        if _input_format(qmodel) == "int8"
        else f"int{bits} {'symmetric' if sym else 'asymmetric'}, group {gs}"
    )
    if qc["kv_cache_scheme"] is not None:
        label += ", fp8 KV cache"
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
    swapped = experts.swapped_on_load(qmodel).drop
    skip = _common.quantized_weight_keys(qmodel) | experts.fused_keys(qmodel)
    dense_keys = [k for k in qmodel.model.state_dict() if k not in skip and k not in swapped]
    merged = _common.merged_on_load(qmodel.model, dense_keys)
    if merged:
        body += (
            f"\n\nNote: {len(merged)} dense tensor(s) of this model (e.g. `{merged[0]}`) are stored under the "
            "original checkpoint's names, which transformers' loader merges on load; transformers (5.25) drops "
            "such dense tensors when it loads a compressed-tensors checkpoint (an error, or parameters "
            "initialized anew: check the load report). Engines that read the checkpoint's names (vLLM) are "
            "not affected; compressed-tensors' own decompression reads every tensor."
        )
    tags = ["compressed-tensors", "calibra", f"{bits}-bit" if fmt == "int" else fmt]
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
    checkpoint = {"format": qc["format"], "bits": bits, "group_size": gs, "symmetric": sym}
    if merged:  # dense tensors transformers' compressed-tensors load drops (the card says so)
        checkpoint["merged_on_load"] = merged
    return {"checkpoint": checkpoint}
