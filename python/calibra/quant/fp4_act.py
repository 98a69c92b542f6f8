"""FP4 (E2M1) activation arithmetic of the W4A4 schemes, exactly as compressed-tensors 0.20 computes it
(``--scheme nvfp4`` / ``mxfp4``).

The companion of ``calibra.quant.fp8`` / ``calibra.quant.int8`` for 4-bit inputs: one copy of the math that
the simulation, the calibrated global scales and the export share. The rules, read from compressed-tensors
(``quantization/utils/helpers.py: compute_dynamic_scales_and_zp / calculate_qparams / generate_gparam``,
``utils/mxfp_utils.py``, ``lifecycle/forward_helpers.py: _process_group / _quantize_dequantize``,
``utils/fp4_utils.py: cast_to_fp4``):

- **E2M1 rounding**: clamp to [-6, 6], then to the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6 with ties to the
  value whose code is even (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4).
- **NVFP4 inputs** (preset ``NVFP4``: ``tensor_group``, group 16, ``dynamic: local``): a *static* global
  scale per Linear, ``g = 448 * 6 / absmax`` (float32; an absmax of 0 gives 1), calibrated on the inputs;
  and per group of 16 along the hidden dimension a *dynamic* local scale, computed at run time:
  ``s = e4m3(g * amax_group / 6)`` (``amax_group / 6`` in the input's dtype, times g in float32, clamped
  to +-448 and rounded to float8_e4m3fn; an exact 0 becomes 0.125); the value is
  ``e2m1(x / (s / g)) * (s / g)``, back in the input's dtype.
- **MXFP4 inputs** (preset ``MXFP4``: ``group``, group 32, dynamic, uint8 scales): per group of 32 an E8M0
  scale computed at run time: the group's absmax rounded to a power of two (up when its mantissa is
  >= 1.75, by adding a quarter of the exponent step to the bits), ``e = 127 + floor(log2 p) - 2`` clamped to
  [0, 255], ``scale = 2^(e - 127)`` in the input's dtype (an exact 0 becomes 1); the value is
  ``e2m1(x / scale) * scale``.

vLLM's NVFP4 kernels compute the same block scales from the same global scale (``scaled_fp4_quant``); calibra
simulates compressed-tensors' arithmetic, the implementation it can check bit for bit on a CPU
(``tests/quant/test_fp4_act.py``).
"""

from __future__ import annotations

import torch

from calibra.quant.fp8 import absmax

E2M1_MAX = 6.0
FP8_MAX = 448.0
NVFP4_GROUP = 16
MXFP4_GROUP = 32
NVFP4_ZERO_SCALE = 0.125  # compressed-tensors' eps for an FP8 local scale that came out 0


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` clamped to +-6 and rounded to the nearest E2M1 value (ties to the even code), same dtype."""
    a = x.abs().clamp(max=E2M1_MAX)
    out = torch.zeros_like(a)
    # thresholds from the top: each test overrides the ones below it (ties as in the module docstring)
    for lo, closed, v in ((0.25, False, 0.5), (0.75, True, 1.0), (1.25, False, 1.5), (1.75, True, 2.0),
                          (2.5, False, 3.0), (3.5, True, 4.0), (5.0, False, 6.0)):  # fmt: skip
        out = torch.where(a >= lo if closed else a > lo, torch.tensor(v, dtype=a.dtype, device=a.device), out)
    return torch.where(x < 0, -out, out)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The NVFP4 global input scale of a non-negative ``amax``: ``448 * 6 / amax`` in float32, shape ``[1]``,
    computed as compressed-tensors' ``generate_gparam`` (``amax`` clamped to the smallest normal float, times
    448 * 6 after a reciprocal; 1 where it is not finite: an all-zero input)."""
    a = amax.float().reshape(1).clamp(min=torch.finfo(torch.float32).tiny)
    g = a.reciprocal() * (FP8_MAX * E2M1_MAX)  # generate_gparam's ``2688 / a`` is torch's reciprocal-multiply
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


def _groups(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] % size:
        raise ValueError(f"[quantize] FP4 inputs need a hidden size divisible by {size}, got {x.shape[-1]}")
    return x.unflatten(-1, (x.shape[-1] // size, size))


def nvfp4_fake_quant(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4 quantize-dequantize of an activation ``[..., hidden]`` under the static ``global_scale``
    (float32 ``[1]``), with dynamic per-16 E4M3 local scales (module docstring). Result in ``x``'s dtype."""
    xg = _groups(x, NVFP4_GROUP)
    amax = absmax(xg, dim=-1)  # [..., G] in x's dtype
    local = amax / torch.tensor(E2M1_MAX, dtype=amax.dtype, device=amax.device)
    g = global_scale.to(x.device)
    s = (g * local).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to((g * local).dtype)
    s = torch.where(s == 0, torch.tensor(NVFP4_ZERO_SCALE, dtype=s.dtype, device=s.device), s)
    eff = (s / g).unsqueeze(-1)
    q = e2m1_round(xg / eff)
    return (q.to(eff.dtype) * eff).flatten(-2).to(x.dtype)


def _round_to_power_2(a: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``round_to_power_2`` for E2M1 (one mantissa bit): add a quarter of the exponent
    step to the bits and keep sign and exponent."""
    info = {
        torch.float32: (torch.int32, 23, 8),
        torch.bfloat16: (torch.int16, 7, 8),
        torch.float16: (torch.int16, 10, 5),
    }
    if a.dtype not in info:
        raise ValueError(f"[quantize] MXFP4 inputs must be float32, bfloat16 or float16, got {a.dtype}")
    int_dtype, mant, expo = info[a.dtype]
    bits = a.view(int_dtype).to(torch.int32)
    if int_dtype is torch.int16:
        bits = bits & 0xFFFF  # the unsigned 16-bit pattern
    mask = ((1 << (expo + 1)) - 1) << mant
    kept = (bits + (1 << (mant - 2))) & mask
    if int_dtype is torch.int16:
        kept = torch.where(kept >= 1 << 15, kept - (1 << 16), kept)  # back to the signed view
    return kept.to(int_dtype).view(a.dtype)


def mxfp4_scale(x: torch.Tensor) -> torch.Tensor:
    """The dynamic per-32 scales ``[..., G]`` of an activation ``[..., hidden]``, in ``x``'s dtype."""
    amax = absmax(_groups(x, MXFP4_GROUP), dim=-1)
    e = 127 + torch.floor(torch.log2(_round_to_power_2(amax))) - 2
    e = torch.round(e.clamp(0, 255)).to(torch.uint8).to(amax.dtype)
    s = (2.00 ** ((e.to(torch.int32) - 127).to(torch.float))).to(amax.dtype)
    return torch.where(s == 0, torch.ones((), dtype=s.dtype, device=s.device), s)


def mxfp4_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Dynamic MXFP4 quantize-dequantize of an activation ``[..., hidden]`` (module docstring)."""
    s = mxfp4_scale(x).unsqueeze(-1)
    q = e2m1_round(_groups(x, MXFP4_GROUP) / s)
    return (q.to(s.dtype) * s).flatten(-2).to(x.dtype)


__all__ = [
    "E2M1_MAX",
    "NVFP4_GROUP",
    "MXFP4_GROUP",
    "e2m1_round",
    "nvfp4_global_scale",
    "nvfp4_fake_quant",
    "mxfp4_scale",
    "mxfp4_fake_quant",
]
