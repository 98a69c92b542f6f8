"""calibra::gptq_block_sweep -- GPTQ's sequential column sweep over one block of columns.

The solver (:mod:`calibra.quant.gptq`) runs the lazy-batch loop: for each block it calls this op and
then applies ``W[:, end:] -= err @ U[block, end:]`` with one GEMM. The op does the part that cannot be
a GEMM -- column by column, fit group parameters where a group starts, quantize the column, scale
its error by ``1 / U[i, i]`` and push it onto the block's remaining columns -- in native code,
vectorized over the output rows (rows are independent). A ``mask`` input prunes weights to 0 instead
of (or before) quantizing them, so SparseGPT can reuse the same sweep.

calibra::sparsegpt_block_sweep is its sibling for SparseGPT's N:M patterns: the same sweep (same kernel
core on every backend), but the prune mask is chosen *inside* the sweep -- at the first column of every
group of ``m`` columns, per row, the ``n`` most salient of the group's current (error-updated) weights
are kept, by OBS's saliency ``w^2 / U_jj^2`` -- and returned as a sixth output. A sibling op rather than
``(n, m)`` scalars on gptq_block_sweep: the mask it chooses is an output, so the N:M sweep has one more
output than GPTQ's; one schema per op keeps every layer (schema, binding, C++ entry point, kernel
params) one name with one signature, and GPTQ's callers and their 5-output results stay untouched.

Exact arithmetic: :mod:`calibra.ops._ref.gptq` (same operations in the same order per element as the
kernels, so codes match bit for bit).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from calibra.ops import _ref
from calibra.ops._checks import check_dtype, check_rank, check_same_device, check_tensor
from calibra.ops._ref.gptq import FORMATS, fit_params, quantize_values
from calibra.ops._registry import cuda_data_error, define

_SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_OP = "gptq_block_sweep"


def _check(w, u, scales, zeros, group, fit, mask, shrink, bits, symmetric, format, scale_dtype, global_scale):
    check_rank(_OP, "w", w, rank=2)
    check_dtype(_OP, "w", w, torch.float32)
    rows, c = w.shape
    check_rank(_OP, "u", u, rank=2)
    check_dtype(_OP, "u", u, torch.float32)
    if tuple(u.shape) != (c, c):
        raise ValueError(f"[{_OP}] u must be [C, C] = {(c, c)} for w {tuple(w.shape)}, got {tuple(u.shape)}")
    for name, t in (("scales", scales), ("zeros", zeros)):
        check_rank(_OP, name, t, rank=2)
        check_dtype(_OP, name, t, torch.float32)
        if t.shape[0] != rows or t.shape[1] != scales.shape[1]:
            raise ValueError(
                f"[{_OP}] {name} must be [R, G] with R = {rows} rows like w (and zeros shaped like "
                f"scales), got {tuple(t.shape)}"
            )
    for name, t in (("group", group), ("fit", fit)):
        check_rank(_OP, name, t, rank=1)
        check_dtype(_OP, name, t, torch.int32)
        if t.shape[0] != c:
            raise ValueError(f"[{_OP}] {name} must be int32 [C] = [{c}], got {tuple(t.shape)}")
    if c and scales.shape[1] == 0:
        raise ValueError(f"[{_OP}] the parameter table (scales) has no entries but w has {c} columns")
    check_tensor(_OP, "mask", mask)
    check_dtype(_OP, "mask", mask, torch.uint8)
    if mask.numel() and tuple(mask.shape) != (rows, c):
        raise ValueError(f"[{_OP}] mask must be uint8 [R, C] = {(rows, c)} or empty, got {tuple(mask.shape)}")
    check_rank(_OP, "shrink", shrink, rank=1)
    check_dtype(_OP, "shrink", shrink, torch.float32)
    if shrink.shape[0] < 1:
        raise ValueError(f"[{_OP}] shrink needs at least one candidate (pass [1.0] for plain min/max)")
    check_same_device(_OP, w=w, u=u, scales=scales, zeros=zeros, group=group, fit=fit, mask=mask, shrink=shrink)
    if format not in FORMATS:
        raise ValueError(f"[{_OP}] format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "int" and not (isinstance(bits, int) and 2 <= bits <= 8):
        raise ValueError(f"[{_OP}] bits must be in [2, 8] for format 'int', got {bits!r}")
    if scale_dtype not in _SCALE_DTYPES:
        raise TypeError(f"[{_OP}] scale_dtype must be float32, float16 or bfloat16, got {scale_dtype}")
    if not (global_scale > 0 and global_scale < float("inf")):
        raise ValueError(f"[{_OP}] global_scale must be positive and finite, got {global_scale}")


def _alloc(w, u, scales, zeros, *args):
    rows, c = w.shape
    return (
        torch.empty((rows, c), dtype=torch.float32, device=w.device),
        torch.empty((rows, c), dtype=torch.uint8, device=w.device),
        torch.empty((rows, c), dtype=torch.float32, device=w.device),
        torch.empty(tuple(scales.shape), dtype=torch.float32, device=w.device),
        torch.empty(tuple(scales.shape), dtype=torch.float32, device=w.device),
    )


def _example(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 24, generator=g)
    h = x.T @ x + 0.1 * torch.eye(24)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    w = torch.randn(8, 16, generator=g)
    fit = torch.zeros(16, dtype=torch.int32)
    fit[0] = fit[8] = 8
    return (
        w.to(device),
        u[:16, :16].contiguous().to(device),
        torch.zeros(8, 2, device=device),
        torch.zeros(8, 2, device=device),
        (torch.arange(16, dtype=torch.int32) // 8).to(device),
        fit.to(device),
        torch.empty(0, dtype=torch.uint8, device=device),
        torch.tensor([1.0, 0.9], device=device),
        4,
        False,
        "int",
        torch.float16,
        1.0,
    )


define(
    _OP,
    "(Tensor w, Tensor u, Tensor scales, Tensor zeros, Tensor group, Tensor fit, Tensor mask, "
    "Tensor shrink, int bits, bool symmetric, str format, ScalarType scale_dtype, float global_scale) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    check=_check,
    alloc=_alloc,
    ref=_ref.gptq_block_sweep,
    native_contiguous=True,
    example=_example,
)


@cuda_data_error(_OP)
def _cuda_bad_data(index, w, u, scales, zeros, group, fit, *rest):
    from calibra.ops._ref.gptq import _check_data

    _check_data(group.cpu(), fit.cpu(), scales.shape[1])


_NM_OP = "sparsegpt_block_sweep"
_NM_MAX_M = 32  # as calibra::nm_mask


def _nm_check(w, u, scales, zeros, group, fit, shrink, n, m, bits, symmetric, format, scale_dtype, global_scale):
    mask = torch.empty(0, dtype=torch.uint8, device=w.device)
    try:
        _check(w, u, scales, zeros, group, fit, mask, shrink, bits, symmetric, format, scale_dtype, global_scale)
    except (ValueError, TypeError) as e:  # the same checks, named for this op
        raise type(e)(str(e).replace(f"[{_OP}]", f"[{_NM_OP}]", 1)) from None
    if isinstance(n, bool) or isinstance(m, bool) or not (0 < n < m <= _NM_MAX_M):
        raise ValueError(f"[{_NM_OP}] need 0 < n < m <= {_NM_MAX_M}, got n={n!r} m={m!r}")
    c = w.shape[1]
    if c % m:
        raise ValueError(
            f"[{_NM_OP}] the block's column count ({c}) must be a multiple of m = {m}: an N:M group "
            f"must not straddle two blocks"
        )


def _nm_alloc(w, u, scales, zeros, *args):
    rows, c = w.shape
    return _alloc(w, u, scales, zeros) + (torch.empty((rows, c), dtype=torch.bool, device=w.device),)


def _nm_example(device):
    w, u, scales, zeros, group, fit, _mask, shrink, bits, sym, fmt, sdt, gscale = _example(device)
    w = w.clone()
    w[0, 4:8] = w[0, 4]  # a tie inside a group
    return (w, u, scales, zeros, group, fit, shrink, 2, 4, bits, sym, fmt, sdt, gscale)


define(
    _NM_OP,
    "(Tensor w, Tensor u, Tensor scales, Tensor zeros, Tensor group, Tensor fit, Tensor shrink, int n, "
    "int m, int bits, bool symmetric, str format, ScalarType scale_dtype, float global_scale) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    check=_nm_check,
    alloc=_nm_alloc,
    ref=_ref.sparsegpt_block_sweep,
    native_contiguous=True,
    example=_nm_example,
)


@cuda_data_error(_NM_OP)
def _cuda_nm_bad_data(index, w, u, scales, zeros, group, fit, *rest):
    from calibra.ops._ref.gptq import _check_data

    try:
        _check_data(group.cpu(), fit.cpu(), scales.shape[1])
    except ValueError as e:
        raise ValueError(str(e).replace(f"[{_OP}]", f"[{_NM_OP}]", 1)) from None


class SweepResult(NamedTuple):
    q: torch.Tensor
    """float32 [R, C]: the quantized values of the block (0 where masked)."""
    codes: torch.Tensor
    """uint8 [R, C]: integer codes (GPTQ convention) or E2M1 codes; 0 for format "none"."""
    err: torch.Tensor
    """float32 [R, C]: (x - q) / U[i, i] per column, for the lazy update of the later columns."""
    scales: torch.Tensor
    """float32 [R, G]: the parameter table after the fits."""
    zeros: torch.Tensor
    """float32 [R, G]: zero points (integer-valued; 0 for FP4)."""


def gptq_block_sweep(
    w: torch.Tensor,
    u: torch.Tensor,
    *,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: torch.Tensor,
    fit: torch.Tensor,
    mask: torch.Tensor | None = None,
    shrink: torch.Tensor | None = None,
    bits: int = 4,
    symmetric: bool = True,
    format: str = "int",
    scale_dtype: torch.dtype = torch.float32,
    global_scale: float = 1.0,
) -> SweepResult:
    """GPTQ's column sweep over one block (see the module doc and ``csrc/include/calibra/params/gptq.h``).

    Args:
        w: float32 ``[R, C]``, the block of W after the earlier blocks' lazy updates (not modified).
        u: float32 ``[C, C]``, the block's diagonal block of the upper Cholesky factor of H^-1.
        scales, zeros: float32 ``[R, G]``, the parameter table in (static groups, per-row params, or
            placeholders for entries fitted in the sweep).
        group: int32 ``[C]``, the table entry each column uses.
        fit: int32 ``[C]``; ``fit[i] = L > 0`` fits entry ``group[i]`` at column ``i`` from the current
            (error-updated) columns ``[i, i + L)``, which must lie in the block.
        mask: uint8 ``[R, C]`` (1 = set the weight to 0), or None.
        shrink: float32 ``[K]`` clipping candidates (range scaled by each; min squared error wins), or
            None for plain min/max.
        bits, symmetric: integer grid (``format="int"``).
        format: ``"int"``, ``"mxfp4"``, ``"nvfp4"`` or ``"none"`` (no quantization, mask only).
        scale_dtype: int scales are rounded to this dtype when fitted (the dtype they are stored in).
        global_scale: NVFP4's per-tensor divisor (1 otherwise).
    """
    if mask is None:
        mask = torch.empty(0, dtype=torch.uint8, device=w.device)
    if shrink is None:
        shrink = torch.ones(1, dtype=torch.float32, device=w.device)
    return SweepResult(
        *torch.ops.calibra.gptq_block_sweep(
            w, u, scales, zeros, group, fit, mask, shrink, bits, symmetric, format, scale_dtype, float(global_scale)
        )
    )


def fit_group_params(
    x: torch.Tensor,
    *,
    format: str,
    bits: int = 4,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    global_scale: float = 1.0,
    shrink: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of fp32 ``x [R, L]`` with the sweep's fitting rule, computed in torch on x's
    device (for static groups, per-row params and RTN; the squared errors are summed in bulk)."""
    if shrink is None:
        shrink = torch.ones(1, dtype=torch.float32)
    return fit_params(x.float(), format, bits, symmetric, scale_dtype, global_scale, shrink, sequential=False)


def quantize_with_params(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, format: str, bits: int = 4, global_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, values fp32) of fp32 ``x`` with broadcast params, the sweep's quantizer in torch."""
    return quantize_values(x.float(), scale.float(), zero.float(), format, bits, global_scale)


class NMSweepResult(NamedTuple):
    q: torch.Tensor
    """float32 [R, C]: the block's final weights (0 where pruned)."""
    codes: torch.Tensor
    """uint8 [R, C]: codes as gptq_block_sweep's (the zero point's code where pruned in format "int")."""
    err: torch.Tensor
    """float32 [R, C]: (x - q) / U[i, i] per column, for the lazy update of the later columns."""
    scales: torch.Tensor
    """float32 [R, G]: the parameter table after the fits."""
    zeros: torch.Tensor
    """float32 [R, G]: zero points."""
    prune: torch.Tensor
    """bool [R, C]: the mask the sweep chose, True where the weight was pruned (exactly m - n per group)."""


def sparsegpt_block_sweep(
    w: torch.Tensor,
    u: torch.Tensor,
    *,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: torch.Tensor,
    fit: torch.Tensor,
    n: int,
    m: int,
    shrink: torch.Tensor | None = None,
    bits: int = 4,
    symmetric: bool = True,
    format: str = "none",
    scale_dtype: torch.dtype = torch.float32,
    global_scale: float = 1.0,
) -> NMSweepResult:
    """SparseGPT's N:M column sweep over one block: :func:`gptq_block_sweep`'s sweep (same arguments but
    ``mask``), choosing the prune mask inside it.

    At every column ``i`` with ``i % m == 0``, for each row, the saliencies ``x^2 / (U_jj * U_jj)`` of the
    current (error-updated) weights ``x[:, i:i + m]`` are ranked -- rank of j = #{k: s_k > s_j} +
    #{k < j: s_k == s_j}, i.e. among equal saliencies the lower index is kept (calibra::nm_mask's rule) --
    and the ``m - n`` of rank >= n are pruned as the sweep reaches them. Then as gptq_block_sweep: fit
    where ``fit[i] > 0``, quantize (format ``"int"`` etc.; ``"none"`` prunes only), prune, push the error.

    Args:
        n, m: ``0 < n < m <= 32``; the block's column count must be a multiple of ``m``.
        the others: see :func:`gptq_block_sweep`.

    Returns:
        :class:`NMSweepResult`: gptq_block_sweep's five outputs plus the chosen mask ``prune``.
    """
    if shrink is None:
        shrink = torch.ones(1, dtype=torch.float32, device=w.device)
    return NMSweepResult(
        *torch.ops.calibra.sparsegpt_block_sweep(
            w,
            u,
            scales,
            zeros,
            group,
            fit,
            shrink,
            int(n),
            int(m),
            bits,
            symmetric,
            format,
            scale_dtype,
            float(global_scale),
        )
    )
