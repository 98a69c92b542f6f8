"""FP8 E4M3 arithmetic exactly as compressed-tensors 0.20 (and vLLM's FP8 linear) compute it.

One copy of the math that weights, activations and the KV cache share, so that what calibra simulates,
what it exports and what an engine computes are the same numbers. The rules, read from compressed-tensors
(``quantization/utils/helpers.py: calculate_qparams``, ``lifecycle/forward_helpers.py:
_quantize_dequantize``, ``quant_args.py: round_to_quantized_type_args``):

- **scale** of a symmetric FP8 range: ``max(|min(x, 0)|, |max(x, 0)|) / 448`` computed in the observed
  tensor's dtype (448 = ``(q_max - q_min) / 2`` with E4M3's +-448); a scale that comes out exactly 0 (an
  all-zero tensor or token) is replaced by ``torch.finfo(dtype).eps``, never left at 0 (no division by 0).
- **rounding**: ``x / scale``, clamped to [-448, 448], cast to ``torch.float8_e4m3fn`` (round to nearest
  even) and back to ``x``'s dtype; **dequantized** as ``q.to(scale.dtype) * scale``.
- **dynamic per-token** activations (``strategy: token``): one scale per token, the absmax over the
  hidden (last) dimension. compressed-tensors reduces every dimension but the first two, which for the
  ``[batch, tokens, hidden]`` input of a transformers Linear is the same thing; vLLM flattens to
  ``[tokens, hidden]`` and reduces the last dimension. calibra reduces the last dimension for any rank
  (for a 2-D input compressed-tensors would fall back to one scale for the whole tensor; vLLM does not).
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def fp8_scale(absmax: torch.Tensor) -> torch.Tensor:
    """The FP8 scale of a non-negative ``absmax`` (any shape), in ``absmax``'s dtype: ``absmax / 448``,
    with an exact 0 replaced by the dtype's eps (compressed-tensors' rule)."""
    s = absmax / torch.tensor(FP8_MAX, dtype=absmax.dtype, device=absmax.device)
    return torch.where(s == 0, torch.tensor(_eps(s.dtype), dtype=s.dtype, device=s.device), s)


def absmax(x: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """``max(|min(x, 0)|, |max(x, 0)|)`` over ``dim`` (all when None), in ``x``'s dtype."""
    if dim is None:
        lo, hi = torch.aminmax(x)
    else:
        lo, hi = x.amin(dim=dim, keepdim=keepdim), x.amax(dim=dim, keepdim=keepdim)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.maximum(torch.minimum(lo, zero).abs(), torch.maximum(hi, zero))


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded to E4M3 (``torch.float8_e4m3fn``), clamped to +-448 first."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes * scale`` in ``scale``'s dtype."""
    return codes.to(scale.dtype) * scale


def fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize ``x`` with ``scale`` (broadcast against it), result in ``x``'s dtype.

    The intermediate goes through ``x``'s dtype as compressed-tensors' fused path does (``x / scale`` in
    ``x``'s dtype -- a float32 ``scale`` promotes it -- rounded to FP8, back to that dtype, times scale)."""
    scaled = x / scale
    q = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).to(scaled.dtype)
    return (q.to(scale.dtype) * scale).to(x.dtype)


def dynamic_token_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-token scale of an activation ``[..., hidden]``: shape ``[..., 1]``, ``x``'s dtype."""
    return fp8_scale(absmax(x, dim=-1, keepdim=True))


def fp8_fake_quant_dynamic(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token FP8 quantize-dequantize of an activation (see the module docstring)."""
    return fp8_fake_quant(x, dynamic_token_scale(x))


def fp8_quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8 RTN of ``w [out, in]``: ``(codes float8_e4m3fn [out, in], scales [out, 1])``,
    scales in ``w``'s dtype (compressed-tensors' ``strategy: channel`` weight)."""
    scales = fp8_scale(absmax(w, dim=1, keepdim=True))
    return fp8_codes(w, scales), scales


__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "absmax",
    "fp8_scale",
    "fp8_codes",
    "fp8_dequantize",
    "fp8_fake_quant",
    "fp8_fake_quant_dynamic",
    "dynamic_token_scale",
    "fp8_quantize_weight",
]
