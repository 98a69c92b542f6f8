"""References for the quantize family: round-to-nearest quantization of a 2-D weight ``[out, in]``.

Integer (GPTQ convention, so GPTQ and compressed-tensors exports are exact)
    maxq = 2^bits - 1. Symmetric: scale = 2 * amax / maxq and zero = (maxq + 1) / 2. Asymmetric:
    xmin = min(min(w), 0), xmax = max(max(w), 0), scale = (xmax - xmin) / maxq and
    zero = clamp(round(-xmin / scale), 0, maxq). The scale is rounded to w's dtype first; a stored
    scale of 0 (an all-zero group, or one too small for the dtype) is replaced by 1. Zero and codes
    are then computed from that stored scale in fp32 with true divisions:
    q = clamp(round(w / scale) + zero, 0, maxq). ``round`` is round-half-to-even everywhere.

FP4 (E2M1 codes ``sign << 3 | idx``, idx indexing [0, .5, 1, 1.5, 2, 3, 4, 6])
    Rounding to E2M1 is to nearest with ties to the even code, saturating at 6. A value that rounds to
    magnitude zero (including -0) is code 0, never 8.
    mxfp4: groups of 32; E8M0 scale byte = e + 127 with e = floor(log2(amax)) - 2 (frexp, exact),
    clamped to [-127, 127]; an all-zero group stores 0. codes = e2m1(w / 2^e). global_scale = 1.
    nvfp4: groups of 16; global_scale = 448 * 6 / amax(W) (1 when amax is 0); group scale
    s = e4m3(amax_group / 6 * global_scale); d = float(s) / global_scale; codes = e2m1(w / d)
    (0 where d == 0).

NaN/Inf anywhere in w raises ValueError naming the first bad element in row-major order.
"""

from __future__ import annotations

import torch

from calibra.finite import first_nonfinite

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def check_weight_finite(w: torch.Tensor, op: str = "quantize") -> None:
    """The op's data check on its weight argument ``w``: NaN/Inf raises naming the first bad element."""
    bad = first_nonfinite(w)
    if bad is not None:
        r, c = bad
        raise ValueError(f"[{op}] w contains NaN/Inf (first at row {r}, col {c})")


def _groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """w as fp32 [out, G, gs]."""
    out, n = w.shape
    gs = n if group_size == -1 else group_size
    g = 1 if group_size == -1 else n // group_size
    return w.float().reshape(out, g, gs), g


def _int_scale_zero(wg: torch.Tensor, bits: int, symmetric: bool, dtype: torch.dtype):
    maxq = float(2**bits - 1)
    if symmetric:
        amax = wg.abs().amax(dim=-1) if wg.shape[-1] else wg.new_zeros(wg.shape[:-1])
        scale = (2.0 * amax) / maxq
    else:
        if wg.shape[-1]:
            xmin = wg.amin(dim=-1).clamp(max=0.0)
            xmax = wg.amax(dim=-1).clamp(min=0.0)
        else:
            xmin = xmax = wg.new_zeros(wg.shape[:-1])
        scale = (xmax - xmin) / maxq
    stored = scale.to(dtype)
    stored = torch.where(stored == 0, torch.ones_like(stored), stored)
    s32 = stored.float()
    if symmetric:
        zero = torch.full_like(s32, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / s32).clamp(0.0, maxq)
    return stored, s32, zero


def quantize_int(w: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    check_weight_finite(w)
    out, n = w.shape
    maxq = float(2**bits - 1)
    wg, g = _groups(w, group_size)
    stored, s32, zero = _int_scale_zero(wg, bits, symmetric, w.dtype)
    q = (torch.round(wg / s32[..., None]) + zero[..., None]).clamp(0.0, maxq)
    codes = q.to(torch.uint8).reshape(out, n)
    return codes, stored.contiguous(), zero.to(torch.uint8)


def dequantize_int(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    out, n = codes.shape
    g = scales.shape[1]
    gs = n if group_size == -1 else group_size
    q = codes.float().reshape(out, g, gs)
    w = (q - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(out, n).to(dtype)


# ---------------------------------------------------------------------------------------------
# FP4


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code of fp32 ``x`` (ties to the even code, saturating at 6; zero -> code 0)."""
    a = x.abs()
    idx = (a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5.0)
    neg = (x < 0) & (idx != 0)
    return idx | (neg.to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def exp2_int(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32 for integer e in [-127, 127], built from the bits (2^-127 is subnormal)."""
    e = e.to(torch.int32)
    bits = torch.where(e >= -126, (e + 127) << 23, torch.full_like(e, 1 << 22))
    return bits.view(torch.float32)


def mx_exponent(amax: torch.Tensor) -> torch.Tensor:
    """floor(log2(amax)) - 2 clamped to [-127, 127], via frexp (exact), for amax > 0."""
    _, ex = torch.frexp(amax)
    return (ex.to(torch.int32) - 1 - 2).clamp(-127, 127)


def quantize_fp4(w: torch.Tensor, format: str):
    check_weight_finite(w)
    out, n = w.shape
    gs = 32 if format == "mxfp4" else 16
    wg = w.float().reshape(out, n // gs, gs)
    amax = wg.abs().amax(dim=-1) if n else wg.new_zeros(out, 0)
    if format == "mxfp4":
        e = mx_exponent(amax)
        scales = torch.where(amax == 0, torch.zeros_like(e), e + 127).to(torch.uint8)
        codes = e2m1_encode(wg / exp2_int(e)[..., None])
        codes = torch.where(amax[..., None] == 0, torch.zeros_like(codes), codes)
        return codes.reshape(out, n), scales, torch.ones(1, dtype=torch.float32, device=w.device)
    tensor_amax = w.float().abs().amax() if w.numel() else torch.zeros((), device=w.device)
    gscale = torch.where(
        tensor_amax == 0, torch.ones_like(tensor_amax), torch.tensor(448.0 * 6.0, device=w.device) / tensor_amax
    ).reshape(1)
    # saturate at e4m3's largest value before the cast: torch < 2.12 casts |x| > 464 to NaN, newer torch
    # saturates (pytorch#178817); the native kernels saturate on every version
    s = ((amax / 6.0) * gscale).clamp(max=448.0).to(torch.float8_e4m3fn)
    d = s.float() / gscale
    codes = e2m1_encode(wg / d[..., None])
    codes = torch.where(d[..., None] == 0, torch.zeros_like(codes), codes)
    return codes.reshape(out, n), s, gscale


def dequantize_fp4(
    codes: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor, format: str, dtype: torch.dtype
) -> torch.Tensor:
    out, n = codes.shape
    gs = 32 if format == "mxfp4" else 16
    v = e2m1_decode(codes).reshape(out, n // gs, gs)
    if format == "mxfp4":
        e = scales.to(torch.int32) - 127
        d = torch.where(scales == 255, torch.full_like(e, 0x7FC00000).view(torch.float32), exp2_int(e.clamp(-127, 127)))
    else:
        d = scales.float() / global_scale.float()
    return (v * d[..., None]).reshape(out, n).to(dtype)
