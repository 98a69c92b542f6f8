"""Symmetric INT8 activation arithmetic exactly as compressed-tensors 0.20 computes it (``--scheme w8a8``).

The companion of ``calibra.quant.fp8``: one copy of the math the simulation, the static scales and the
export share. The rules, read from compressed-tensors (``quantization/utils/helpers.py:
calculate_qparams`` / ``_calculate_range``, ``lifecycle/forward_helpers.py: _quantize_dequantize``,
``quant_args.py: round_to_quantized_type_args``):

- **range** of 8-bit int: ``q_min = -128``, ``q_max = 127``; a symmetric **scale** is
  ``max(|min(x, 0)|, |max(x, 0)|) / 127.5`` (``(q_max - q_min) / 2``), computed in the observed tensor's
  dtype; a scale that comes out exactly 0 becomes ``torch.finfo(dtype).eps``. (calibra's int8 weights use
  the same ``2 * amax / 255``, see ``calibra.ops._ref.quantize``.)
- **rounding**: ``x / scale``, clamped to [-128, 127], ``torch.round`` (half to even), back to that
  dtype; **dequantized** as ``q.to(scale.dtype) * scale``. The largest positive input lands on 127.5 and
  saturates at 127 (half a step of clipping, compressed-tensors' choice).
- **dynamic per-token** activations reduce the hidden (last) dimension (see ``calibra.quant.fp8``).

vLLM's own INT8 kernels differ in one detail, the dynamic per-token scale: ``absmax / 127`` (and
``x * (127 / absmax)`` rounded half to even), so vLLM never clips the largest value of a token. The
difference is below half a quantization step per token; calibra simulates what compressed-tensors
computes, because that is the implementation it can check bit for bit (``tests/quant/test_int8.py``).
Static scales are stored in the checkpoint, and there both compute ``round(x / scale)`` clamped to
[-128, 127].
"""

from __future__ import annotations

import torch

from calibra.quant.fp8 import absmax

INT8_MIN = -128.0
INT8_MAX = 127.0
INT8_HALF_RANGE = 127.5  # (q_max - q_min) / 2: compressed-tensors' symmetric scale divisor


def int8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The INT8 scale of a non-negative ``amax`` (any shape), in ``amax``'s dtype: ``amax / 127.5``, with an
    exact 0 replaced by the dtype's eps."""
    s = amax / torch.tensor(INT8_HALF_RANGE, dtype=amax.dtype, device=amax.device)
    return torch.where(s == 0, torch.tensor(torch.finfo(s.dtype).eps, dtype=s.dtype, device=s.device), s)


def int8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``scale`` (broadcast against it), result in ``x``'s dtype, through the
    same intermediate dtypes as compressed-tensors' fused path."""
    scaled = x / scale
    q = torch.round(scaled.clamp(INT8_MIN, INT8_MAX))
    return (q.to(scale.dtype) * scale).to(x.dtype)


def dynamic_token_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token scale of an activation ``[..., hidden]``: shape ``[..., 1]``, ``x``'s dtype."""
    return int8_scale(absmax(x, dim=-1, keepdim=True))


def int8_fake_quant_dynamic(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token INT8 quantize-dequantize of an activation."""
    return int8_fake_quant(x, dynamic_token_scale(x))


__all__ = [
    "INT8_MIN",
    "INT8_MAX",
    "INT8_HALF_RANGE",
    "int8_scale",
    "int8_fake_quant",
    "int8_fake_quant_dynamic",
    "dynamic_token_scale",
]
