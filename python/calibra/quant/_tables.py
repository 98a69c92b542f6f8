"""Turning the solvers' fp32 parameter tables into the stored layouts of calibra.ops.quantize."""

from __future__ import annotations

import torch

from calibra.ops.gptq import fit_group_params, quantize_with_params
from calibra.ops.quantize import ragged_pad


def stored_scales(table: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """int: the scale dtype (values were rounded to it when fitted, so this is exact); mxfp4: the E8M0
    byte of 2^e (0 for an all-zero group); nvfp4: float8_e4m3fn (exact: fitted as e4m3 values)."""
    if fmt == "int":
        return table.to(dtype)
    if fmt == "nvfp4":
        return table.to(torch.float8_e4m3fn)
    _, ex = torch.frexp(table)  # table holds 2^e exactly: frexp exponent is e + 1
    return torch.where(table == 0, torch.zeros_like(ex), ex - 1 + 127).to(torch.uint8)


def nvfp4_global_scale(w: torch.Tensor) -> float:
    """448 * 6 / amax(w) (1 when w is all zero), as calibra.ops._ref.quantize computes it in fp32."""
    amax = w.float().abs().amax() if w.numel() else torch.zeros(())
    if float(amax) == 0.0:
        return 1.0
    return float(torch.tensor(448.0 * 6.0) / amax)


def fit_groups(
    w: torch.Tensor,
    group_size: int,
    *,
    fmt: str,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype,
    global_scale: float,
    shrink: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) fp32 (scales, zeros) [out, G] of fp32 w fitted group by group in torch; a ragged last
    group (group_size not dividing in) is fitted on its own columns (zero padding is exact: ragged_pad)."""
    out, n = w.shape
    gs = n if group_size == -1 else group_size
    w = pad_columns(w, gs)
    g = w.shape[1] // gs if n else 0
    s, z = fit_group_params(
        w.reshape(out * g, gs),
        format=fmt,
        bits=bits,
        symmetric=sym,
        scale_dtype=scale_dtype,
        global_scale=global_scale,
        shrink=shrink,
    )
    return s.reshape(out, g), z.reshape(out, g)


def quantize_groups(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    *,
    fmt: str,
    bits: int,
    global_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, values fp32) of w [out, in] with per-group fp32 tables [out, G] (G = ceil(in / group_size))."""
    out, n = w.shape
    g = scales.shape[1]
    gs = n if group_size == -1 else group_size
    codes, vals = quantize_with_params(
        pad_columns(w.float(), gs).reshape(out, g, gs),
        scales[..., None],
        zeros[..., None],
        format=fmt,
        bits=bits,
        global_scale=global_scale,
    )
    return codes.reshape(out, -1)[:, :n], vals.reshape(out, -1)[:, :n]


def pad_columns(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w [R, n]`` with zero columns appended up to a whole number of groups (``w`` itself when none are
    needed). Exact for fitting and quantizing: see :func:`calibra.ops.quantize.ragged_pad`."""
    pad = ragged_pad(w.shape[1], group_size) if w.shape[1] else 0
    return torch.nn.functional.pad(w, (0, pad)) if pad else w
