"""The quantize family: round-to-nearest weight quantization of a 2-D weight ``[out, in]``.

Kernel ops (``torch.ops.calibra.*``):

- ``quantize_int(w, bits, group_size, symmetric) -> (codes, scales, zeros)``: unsigned integer codes in
  the GPTQ convention (``w ~ (q - zero) * scale``), bits 2..8.
- ``dequantize_int(codes, scales, zeros, group_size, dtype) -> w``.
- ``quantize_fp4(w, format) -> (codes, scales, global_scale)``: E2M1 codes with MXFP4 (E8M0 scale per
  32) or NVFP4 (float8_e4m3fn scale per 16 plus an fp32 global scale) scaling.
- ``dequantize_fp4(codes, scales, global_scale, format, dtype) -> w``.

The public API is :func:`quantize` / :func:`dequantize` with :class:`QuantizedTensor`. The exact
arithmetic (rounding, zero-scale policy, NaN policy) is written in :mod:`calibra.ops._ref.quantize`;
every native kernel produces the same codes, zeros and scales bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibra.ops import _ref
from calibra.ops._checks import check_dtype, check_floating, check_rank, check_same_device, check_tensor
from calibra.ops._registry import cuda_data_error, define

_FLOATING = (torch.float32, torch.float16, torch.bfloat16)
FP4_GROUP = {"mxfp4": 32, "nvfp4": 16}


# ---------------------------------------------------------------------------------------------
# checks and shape functions


def _check_w(op: str, w) -> None:
    check_rank(op, "w", w, rank=2)
    check_floating(op, "w", w, _FLOATING)


def _check_group_size(op: str, group_size, n) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"[{op}] group_size must be an int (or -1 for one group per row), got {group_size!r}")
    if group_size == -1:
        return
    if group_size < 1:
        raise ValueError(
            f"[{op}] group_size must be -1 (one group per row) or a positive divisor of in_features, got {group_size}"
        )
    if n % group_size:
        raise ValueError(
            f"[{op}] group_size {group_size} does not divide in_features {n} (the op takes whole groups; "
            f"calibra.ops.quantize / dequantize pad a ragged last group)"
        )


def _check_bits(op: str, bits) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise TypeError(f"[{op}] bits must be an int, got {bits!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"[{op}] bits must be in [2, 8], got {bits}")


def _check_format(op: str, format) -> None:
    if format not in FP4_GROUP:
        raise ValueError(f"[{op}] format must be one of 'mxfp4', 'nvfp4', got {format!r}")


def _check_out_dtype(op: str, dtype) -> None:
    if dtype not in _FLOATING:
        raise TypeError(f"[{op}] dtype must be one of float32, float16, bfloat16, got {dtype}")


def _ngroups(n, group_size: int):
    return 1 if group_size == -1 else n // group_size


def n_groups(n: int, group_size: int) -> int:
    """Groups of ``group_size`` columns over ``n`` columns, a ragged last one counted: ``ceil(n / group_size)``
    (1 for group_size -1). Group ``g`` covers columns ``[g * group_size, min((g + 1) * group_size, n))``, the
    reference GPTQ's layout (``g_idx = col // group_size``)."""
    return 1 if group_size == -1 else -(-n // group_size)


def ragged_pad(n: int, group_size: int) -> int:
    """Columns of zeros that complete a ragged last group (0 when ``group_size`` divides ``n`` or is -1).

    Padding a weight with zero columns is exact for every grid here: a zero never moves a group's range
    (int: min is clamped to <= 0 and max to >= 0; FP4: amax, and NVFP4's tensor amax), it quantizes to
    exactly 0 (the zero point's code; E2M1 code 0), so it adds no error to a clipping search either. The
    ops below therefore keep their whole-group kernels and a ragged group is those kernels on the padded
    weight, the padding cut off again."""
    return 0 if group_size == -1 or n % group_size == 0 else group_size - n % group_size


def _check_quantize_int(w, bits, group_size, symmetric) -> None:
    _check_w("quantize", w)
    _check_bits("quantize", bits)
    _check_group_size("quantize", group_size, w.shape[1])
    if not isinstance(symmetric, bool):
        raise TypeError(f"[quantize] symmetric must be a bool, got {symmetric!r}")


def _alloc_quantize_int(w, bits, group_size, symmetric):
    out, n = w.shape
    g = _ngroups(n, group_size)
    return (
        torch.empty((out, n), dtype=torch.uint8, device=w.device),
        torch.empty((out, g), dtype=w.dtype, device=w.device),
        torch.empty((out, g), dtype=torch.uint8, device=w.device),
    )


def _check_dequantize_int(codes, scales, zeros, group_size, dtype) -> None:
    op = "dequantize"
    check_rank(op, "codes", codes, rank=2)
    check_dtype(op, "codes", codes, torch.uint8)
    check_rank(op, "scales", scales, rank=2)
    check_floating(op, "scales", scales, _FLOATING)
    check_rank(op, "zeros", zeros, rank=2)
    check_dtype(op, "zeros", zeros, torch.uint8)
    check_same_device(op, codes=codes, scales=scales, zeros=zeros)
    _check_group_size(op, group_size, codes.shape[1])
    _check_out_dtype(op, dtype)
    out, n = codes.shape
    g = _ngroups(n, group_size)
    if tuple(scales.shape) != (out, g):
        raise ValueError(
            f"[{op}] scales must have shape {(out, g)} for codes {tuple(codes.shape)} and "
            f"group_size {group_size}, got {tuple(scales.shape)}"
        )
    if tuple(zeros.shape) != (out, g):
        raise ValueError(f"[{op}] zeros must have shape {(out, g)} (like scales), got {tuple(zeros.shape)}")


def _alloc_dequantize(codes, *args):
    dtype = args[-1]
    return torch.empty(tuple(codes.shape), dtype=dtype, device=codes.device)


def _check_quantize_fp4(w, format) -> None:
    _check_w("quantize", w)
    _check_format("quantize", format)
    gs = FP4_GROUP[format]
    if w.shape[1] % gs:
        raise ValueError(
            f"[quantize] {format} needs in_features divisible by its group size {gs}, got in_features {w.shape[1]}"
        )


def _alloc_quantize_fp4(w, format):
    out, n = w.shape
    g = n // FP4_GROUP[format]
    sdtype = torch.uint8 if format == "mxfp4" else torch.float8_e4m3fn
    return (
        torch.empty((out, n), dtype=torch.uint8, device=w.device),
        torch.empty((out, g), dtype=sdtype, device=w.device),
        torch.empty((1,), dtype=torch.float32, device=w.device),
    )


def _check_dequantize_fp4(codes, scales, global_scale, format, dtype) -> None:
    op = "dequantize"
    _check_format(op, format)
    check_rank(op, "codes", codes, rank=2)
    check_dtype(op, "codes", codes, torch.uint8)
    check_rank(op, "scales", scales, rank=2)
    check_dtype(op, "scales", scales, torch.uint8 if format == "mxfp4" else torch.float8_e4m3fn)
    check_tensor(op, "global_scale", global_scale)
    check_dtype(op, "global_scale", global_scale, torch.float32)
    if tuple(global_scale.shape) != (1,):
        raise ValueError(f"[{op}] global_scale must have shape (1,), got {tuple(global_scale.shape)}")
    check_same_device(op, codes=codes, scales=scales, global_scale=global_scale)
    _check_out_dtype(op, dtype)
    out, n = codes.shape
    gs = FP4_GROUP[format]
    if n % gs:
        raise ValueError(f"[{op}] {format} needs in_features divisible by {gs}, got codes {tuple(codes.shape)}")
    if tuple(scales.shape) != (out, n // gs):
        raise ValueError(
            f"[{op}] scales must have shape {(out, n // gs)} for {format} codes "
            f"{tuple(codes.shape)}, got {tuple(scales.shape)}"
        )


define(
    "quantize_int",
    "(Tensor w, int bits, int group_size, bool symmetric) -> (Tensor, Tensor, Tensor)",
    check=_check_quantize_int,
    alloc=_alloc_quantize_int,
    ref=_ref.quantize_int,
    example=lambda device: (torch.randn(8, 256, device=device), 4, 128, False),
)
define(
    "dequantize_int",
    "(Tensor codes, Tensor scales, Tensor zeros, int group_size, ScalarType dtype) -> Tensor",
    check=_check_dequantize_int,
    alloc=_alloc_dequantize,
    ref=_ref.dequantize_int,
    example=lambda device: (
        torch.randint(0, 16, (8, 256), dtype=torch.uint8, device=device),
        torch.rand(8, 2, device=device),
        torch.randint(0, 16, (8, 2), dtype=torch.uint8, device=device),
        128,
        torch.float32,
    ),
)
define(
    "quantize_fp4",
    "(Tensor w, str format) -> (Tensor, Tensor, Tensor)",
    check=_check_quantize_fp4,
    alloc=_alloc_quantize_fp4,
    ref=_ref.quantize_fp4,
    example=lambda device: (torch.randn(8, 256, device=device), "nvfp4"),
)
define(
    "dequantize_fp4",
    "(Tensor codes, Tensor scales, Tensor global_scale, str format, ScalarType dtype) -> Tensor",
    check=_check_dequantize_fp4,
    alloc=_alloc_dequantize,
    ref=_ref.dequantize_fp4,
    example=lambda device: (
        torch.randint(0, 16, (8, 256), dtype=torch.uint8, device=device),
        torch.randint(100, 140, (8, 8), dtype=torch.uint8, device=device),
        torch.ones(1, device=device),
        "mxfp4",
        torch.float32,
    ),
)


# ---------------------------------------------------------------------------------------------
# public API


@dataclass(frozen=True)
class QuantizedTensor:
    """A weight quantized by :func:`quantize`; :func:`dequantize` turns it back into a dense tensor."""

    codes: torch.Tensor
    """uint8 ``[out, in]``, one code per weight, unpacked, row-major. ``format="int"``: the unsigned code
    ``q`` in ``[0, 2^bits - 1]``. FP4 formats: the E2M1 code ``sign << 3 | idx`` with idx indexing
    ``[0, .5, 1, 1.5, 2, 3, 4, 6]`` (zero is always code 0)."""
    scales: torch.Tensor
    """Per-group scales ``[out, G]``, group ``g`` covering columns ``[g * group_size, (g + 1) * group_size)``
    (the last one ragged, cut at ``in``, when group_size does not divide in: ``int`` only).
    ``int``: w's dtype, G = ceil(in / group_size) (1 for group_size -1). ``mxfp4``: uint8 E8M0 (``2^(s - 127)``),
    G = in / 32. ``nvfp4``: torch.float8_e4m3fn, G = in / 16, to be divided by ``global_scale``."""
    zeros: torch.Tensor | None
    """``int`` only: uint8 ``[out, G]`` zero points (unsigned, GPTQ v2 / "zero" convention, not ``zero - 1``);
    ``(maxq + 1) / 2`` for symmetric. None for FP4 formats."""
    global_scale: torch.Tensor | None
    """FP4 only: float32 ``[1]``; the NVFP4 per-tensor divisor ``448 * 6 / amax(w)`` (1.0 for MXFP4).
    None for ``int``."""
    bits: int
    """Bits per code: 2..8 for ``int``, 4 for FP4."""
    group_size: int
    """Columns per group along ``in``; -1 means one group per row (``int`` only). 32 for mxfp4, 16 for nvfp4."""
    symmetric: bool
    """``int``: symmetric (fixed mid zero point) or asymmetric (min/max) scaling. Always True for FP4."""
    format: str
    """``"int"``, ``"mxfp4"`` or ``"nvfp4"``."""
    shape: tuple
    """The original weight's shape ``(out, in)``."""
    dtype: torch.dtype
    """The original weight's dtype; :func:`dequantize` returns this dtype."""


def quantize(
    w: torch.Tensor, *, bits: int, group_size: int | None, symmetric: bool = True, format: str = "int"
) -> QuantizedTensor:
    """Round-to-nearest quantization of a 2-D weight ``w [out, in]`` (float32, float16 or bfloat16).

    Args:
        bits: 2..8 for ``format="int"``; must be 4 for ``"mxfp4"`` / ``"nvfp4"``.
        group_size: columns per group along ``in``; -1 or None for one group per row (``int``). A size
            that does not divide ``in`` leaves a ragged last group (``int`` only; see :func:`ragged_pad`).
            For FP4 it must be the format's own (32 for mxfp4, 16 for nvfp4) or None.
        symmetric: ``int`` only (FP4 formats are symmetric).
        format: ``"int"``, ``"mxfp4"`` or ``"nvfp4"``.

    Raises ValueError naming the first NaN/Inf of ``w``. See :mod:`calibra.ops._ref.quantize` for the
    exact arithmetic (GPTQ convention; round half to even; the scale is rounded to w's dtype first).
    """
    if format == "int":
        gs = -1 if group_size is None else group_size
        pad = _ragged(w, gs)
        wp = torch.nn.functional.pad(w, (0, pad)) if pad else w
        codes, scales, zeros = torch.ops.calibra.quantize_int(wp, bits, gs, symmetric)
        if pad:
            codes = codes[:, : w.shape[1]].contiguous()
        return QuantizedTensor(codes, scales, zeros, None, bits, gs, symmetric, format, tuple(w.shape), w.dtype)
    if format not in FP4_GROUP:
        raise ValueError(f"[quantize] format must be one of 'int', 'mxfp4', 'nvfp4', got {format!r}")
    want = FP4_GROUP[format]
    if bits != 4:
        raise ValueError(f"[quantize] bits must be 4 for {format}, got {bits}")
    if group_size is not None and group_size != want:
        raise ValueError(f"[quantize] group_size must be {want} (or None) for {format}, got {group_size}")
    if symmetric is not True:
        raise ValueError(f"[quantize] {format} is symmetric; symmetric=False is not supported")
    codes, scales, gscale = torch.ops.calibra.quantize_fp4(w, format)
    return QuantizedTensor(codes, scales, None, gscale, 4, want, True, format, tuple(w.shape), w.dtype)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """The dense ``[out, in]`` weight of ``q`` in ``q.dtype``: ``(code - zero) * scale`` for ``int``,
    ``e2m1(code) * scale`` for FP4 (computed in fp32, rounded once)."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"[dequantize] q must be a QuantizedTensor, got {type(q).__name__}")
    if q.format == "int":
        pad = _ragged(q.codes, q.group_size)
        if not pad:
            return torch.ops.calibra.dequantize_int(q.codes, q.scales, q.zeros, q.group_size, q.dtype)
        # a ragged last group: pad with the zero point's code (value exactly 0), dequantize whole groups, cut
        n = q.codes.shape[1]
        codes = torch.cat([q.codes, q.zeros[:, -1:].expand(-1, pad)], 1)
        return torch.ops.calibra.dequantize_int(codes, q.scales, q.zeros, q.group_size, q.dtype)[:, :n].contiguous()
    return torch.ops.calibra.dequantize_fp4(q.codes, q.scales, q.global_scale, q.format, q.dtype)


def _ragged(t, group_size) -> int:
    """ragged_pad of a well-formed 2-D argument (anything else goes to the op's own checks unpadded)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not isinstance(group_size, int) or group_size < 1:
        return 0
    return ragged_pad(t.shape[1], group_size)


# CUDA kernels report NaN/Inf in w through the registry's data-error flag (row-major index).
@cuda_data_error("quantize_int")
@cuda_data_error("quantize_fp4")
def _nonfinite_cuda_error(index: int, w: torch.Tensor, *args) -> None:
    r, c = divmod(index, max(1, w.shape[1]))
    raise ValueError(f"[quantize] w contains NaN/Inf (first at row {r}, col {c})")
