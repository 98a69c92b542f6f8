"""MLX affine checkpoints (ml-explore/mlx-lm ``mlx_lm.load``).

Per quantized Linear (FORMATS.md section 4): ``weight`` uint32 ``[out, in*bits/32]`` =
``pack(codes, bits)`` viewed as uint32 (packed along the input dim, LSB first), ``scales`` and
``biases`` ``[out, G]`` in the model dtype with ``w = q*scale + bias``, i.e. ``bias = -zero*scale``
(calibra's ``w = (q - zero)*scale``). config.json gets ``quantization: {group_size, bits, mode:
affine}`` (duplicated as ``quantization_config``, as mlx-lm writes it); the safetensors metadata is
``{"format": "mlx"}``. mlx-lm quantizes a module exactly when its ``scales`` are present, so layers
calibra left dense (lm_head, embeddings) load dense.

Refused: group sizes other than 32/64/128 and bits other than 2/4/8 (the layouts verified here; MLX's
3/5/6-bit packing is not), act-order with dynamic groups, non-int layers, rotations, fused experts.
"""

from __future__ import annotations

import torch

from calibra.export import _common
from calibra.export.writer import ExportError
from calibra.ops import pack

NAME = "mlx"


def width_problem(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why a Linear of this shape cannot be written, or None: MLX's affine layout packs whole groups of
    32/64/128 along each row (``mx.quantize`` needs in_features divisible by the group), so a ragged last
    group is kept dense."""
    return _common.ragged_group(out_features, in_features, group_size)


def check(qmodel) -> None:
    _common.refuse_rotation(qmodel, NAME)
    _common.refuse_widths(qmodel, NAME, width_problem)
    _common.refuse_experts(qmodel, NAME)
    fmt, bits, gs, sym = _common.uniform(qmodel, NAME)
    if fmt != "int":
        raise ExportError(
            f"[export] {NAME} affine holds integer codes, the model is quantized to {fmt}; "
            f"export 'compressed-tensors' or 'dense'"
        )
    if bits not in (2, 4, 8):
        raise ExportError(f"[export] {NAME}: bits {bits} is not supported here (2, 4, 8 are)")
    if gs not in (32, 64, 128):
        raise ExportError(
            f"[export] {NAME} group_size must be 32, 64 or 128, the model has {gs}; re-quantize with one of those"
        )
    for n, l in qmodel.layers.items():
        if not _common.trivial_g_idx(l):
            raise ExportError(
                f"[export] {NAME} cannot express act-order's g_idx (layer {n}); quantize with "
                f"static_groups=True (FAULTS row 12)"
            )


def layer_tensors(name: str, l) -> dict[str, torch.Tensor]:
    dt = l.weight.dtype
    s = l.scales.float()
    return {
        f"{name}.weight": pack(l.codes, l.bits).view(torch.uint32),
        f"{name}.scales": l.scales.to(dt),
        f"{name}.biases": (-l.zeros.float() * s).to(dt),
    }


def tensors(qmodel) -> dict[str, torch.Tensor]:
    out = _common.dense_state(qmodel, skip=_common.quantized_weight_keys(qmodel))
    for name, l in qmodel.layers.items():
        out.update(layer_tensors(name, l))
    return out


def write(qmodel, folder, *, max_shard_bytes=None) -> dict:
    check(qmodel)
    fmt, bits, gs, sym = _common.uniform(qmodel, NAME)
    q = {"group_size": gs, "bits": bits, "mode": "affine"}
    body = (
        f"Quantized with calibra (int{bits}, group {gs}, {'symmetric' if sym else 'asymmetric'}); MLX affine "
        f'checkpoint.\n\n```python\nfrom mlx_lm import load, generate\nmodel, tokenizer = load("<this folder>")\n```'
    )
    _common.write_hf_folder(
        folder,
        qmodel,
        tensors(qmodel),
        metadata={"format": "mlx"},
        config_updates={"quantization": q, "quantization_config": dict(q)},
        card={
            "title": f"{qmodel.source} (int{bits} g{gs}, MLX)",
            "library_name": "mlx",
            "tags": ["mlx", f"{bits}-bit", "calibra"],
            "settings": _common.base_card_settings(qmodel, NAME),
            "body": body,
        },
        max_shard_bytes=max_shard_bytes,
    )
    return {"checkpoint": {"format": "mlx-affine", "bits": bits, "group_size": gs, "symmetric": sym}}
