"""calibra::nm_mask, calibra::compress_24, calibra::decompress_24 -- N:M structured sparsity.

On CUDA the data errors (NaN scores, a group with 3 nonzeros, a bad metadata word) are reported
through an int64 flag output, as described in :mod:`calibra.ops.pack`.
"""

from __future__ import annotations

import torch

from calibra.ops import _ref
from calibra.ops._checks import check_dtype, check_floating, check_rank, check_same_device
from calibra.ops._ref.sparsity import bad_meta_message, nan_error_message, not_24_message
from calibra.ops._registry import cuda_data_error, define

_FLOATING = (torch.float32, torch.float16, torch.bfloat16)
MAX_M = 32  # groups are ranked by pairwise comparison in registers: m <= 32 keeps that cheap


def _nm_check(scores: torch.Tensor, n: int, m: int) -> None:
    check_rank("nm_mask", "scores", scores, min_rank=1)
    check_floating("nm_mask", "scores", scores, _FLOATING)
    if not (2 <= m <= MAX_M):
        raise ValueError(f"[nm_mask] m must be in [2, {MAX_M}], got {m}")
    if not (0 < n < m):
        raise ValueError(f"[nm_mask] n must satisfy 0 < n < m = {m}, got {n}")
    k = scores.shape[-1]
    if k % m:
        raise ValueError(f"[nm_mask] the last dim of scores ({k}) must be a multiple of m = {m}")


def _nm_alloc(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


def _c24_check(w: torch.Tensor) -> None:
    check_rank("compress_24", "w", w, rank=2)
    check_floating("compress_24", "w", w, _FLOATING)
    k = w.shape[1]
    if k % 16:
        raise ValueError(
            f"[compress_24] the last dim of w ({k}) must be a multiple of 16 "
            f"(one 16-bit metadata word describes 16 columns)"
        )


def _c24_alloc(w: torch.Tensor):
    r, k = w.shape
    return (
        torch.empty((r, k // 2), dtype=w.dtype, device=w.device),
        torch.empty((r, k // 16), dtype=torch.int16, device=w.device),
    )


def _d24_check(values: torch.Tensor, meta: torch.Tensor) -> None:
    check_rank("decompress_24", "values", values, rank=2)
    check_floating("decompress_24", "values", values, _FLOATING)
    check_rank("decompress_24", "meta", meta, rank=2)
    check_dtype("decompress_24", "meta", meta, torch.int16)
    check_same_device("decompress_24", values=values, meta=meta)
    if values.shape[0] != meta.shape[0] or values.shape[1] != 8 * meta.shape[1]:
        raise ValueError(
            f"[decompress_24] values {tuple(values.shape)} and meta {tuple(meta.shape)} do not match: "
            f"expected values [R, K/2] and meta [R, K/16]"
        )


def _d24_alloc(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    return torch.empty((values.shape[0], values.shape[1] * 2), dtype=values.dtype, device=values.device)


def _example_24(device):
    w = torch.randn(8, 64, device=device)
    w.view(8, 16, 4)[:, :, 1] = 0
    w.view(8, 16, 4)[:, :, 3] = 0
    w.view(8, 16, 4)[:, ::2, 2] = 0  # some groups keep a single nonzero
    return (w,)


def _example_d24(device):
    values, meta = _ref.compress_24(_example_24(device)[0])
    return values, meta


define(
    "nm_mask",
    "(Tensor scores, int n, int m) -> Tensor",
    check=_nm_check,
    alloc=_nm_alloc,
    ref=_ref.nm_mask,
    example=lambda device: (torch.randn(4, 6, 64, device=device), 2, 4),
)
define(
    "compress_24",
    "(Tensor w) -> (Tensor, Tensor)",
    check=_c24_check,
    alloc=_c24_alloc,
    ref=_ref.compress_24,
    example=_example_24,
)
define(
    "decompress_24",
    "(Tensor values, Tensor meta) -> Tensor",
    check=_d24_check,
    alloc=_d24_alloc,
    ref=_ref.decompress_24,
    example=_example_d24,
)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive scores along the last dim.

    Args:
        scores: ``[..., K]`` float32 / float16 / bfloat16, any strides; ``K % m == 0``. NaN is an
            error (ValueError naming its index).
        n, m: ``0 < n < m <= 32``.

    Returns:
        A contiguous bool mask shaped like ``scores``, exactly ``n`` True per group. Ties are broken
        by a stable descending order: among equal scores the lower index wins. -0.0 and +0.0 compare
        equal (so the lower index wins between them too).
    """
    return torch.ops.calibra.nm_mask(scores, int(n), int(m))


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4-sparse matrix into kept values and sparse-tensor-core style metadata.

    Args:
        w: ``[R, K]`` float32 / float16 / bfloat16, any strides, with at most 2 nonzeros in every
            group of 4 consecutive elements along K (-0.0 counts as zero, NaN as nonzero). ``K`` must be
            a multiple of 16 because one 16-bit metadata word describes 16 columns (4 groups).

    Returns:
        ``(values, meta)``: ``values`` ``[R, K/2]`` in ``w``'s dtype, the two kept elements of each group
        in ascending index order; ``meta`` int16 ``[R, K/16]``. Group ``g`` (0..3) of a 16-column chunk
        occupies bits ``4g..4g+3`` of the chunk's word: the first kept index in the low 2 bits, the
        second in the next 2; the two are distinct and ascending. A group with fewer than 2 nonzeros
        is filled up with its lowest unused indices (whose values are then zero).

        This is the per-row metadata *semantics* of NVIDIA sparse tensor cores (``mma.sp`` for
        fp16/bf16: a pair of 2-bit indices per group of 4, 16 bits per 16 columns), in plain row-major
        order. The interleaving of metadata words across threads/rows that a particular ``mma.sp``
        shape expects is a concern of the GEMM that consumes it and is not applied here.
    """
    return torch.ops.calibra.compress_24(w)


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense ``[R, K]`` matrix from :func:`compress_24`'s ``(values, meta)``. A metadata group whose
    two indices are not distinct and ascending raises ValueError naming the word."""
    return torch.ops.calibra.decompress_24(values, meta)


# ---------------------------------------------------------------------------------------------
# CUDA error reporting (index = row-major position of the first bad item)


@cuda_data_error("nm_mask")
def _nm_cuda_error(index: int, scores: torch.Tensor, n: int, m: int) -> None:
    pos = []
    for size in reversed(scores.shape):
        pos.append(index % size)
        index //= size
    raise ValueError(nan_error_message(pos[::-1]))


@cuda_data_error("compress_24")
def _c24_cuda_error(index: int, w: torch.Tensor) -> None:
    r, g = divmod(index, w.shape[1] // 4)
    count = int((w[r, 4 * g : 4 * g + 4] != 0).sum())
    raise ValueError(not_24_message(r, 4 * g, count))


@cuda_data_error("decompress_24")
def _d24_cuda_error(index: int, values: torch.Tensor, meta: torch.Tensor) -> None:
    r, rest = divmod(index, meta.shape[1] * 4)
    j, g = divmod(rest, 4)
    raise ValueError(bad_meta_message(r, j, int(meta[r, j]) & 0xFFFF, g))
