"""calibra::hadamard -- the normalized fast Walsh-Hadamard transform (MR-GPTQ's rotation, QuaRot-style
outlier spreading)."""

from __future__ import annotations

import torch

from calibra.ops import _ref
from calibra.ops._checks import check_floating, check_rank
from calibra.ops._registry import define

_FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _block(x: torch.Tensor, block_size: int) -> int:
    return x.shape[-1] if block_size == -1 else block_size


def _check(x: torch.Tensor, block_size: int) -> None:
    check_rank("hadamard", "x", x, min_rank=1)
    check_floating("hadamard", "x", x, _FLOATING)
    n = x.shape[-1]
    if block_size == -1:
        if n < 1 or n & (n - 1):
            raise ValueError(
                f"[hadamard] the last dim of x is {n}, not a power of two; pass block_size "
                f"(a power of two dividing {n}) for a block-diagonal transform"
            )
        return
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"[hadamard] block_size must be a power of two >= 2 (or None), got {block_size}")
    if n % block_size:
        raise ValueError(f"[hadamard] block_size {block_size} does not divide the last dim of x ({n})")


def _alloc(x: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


define(
    "hadamard",
    "(Tensor x, int block_size) -> Tensor",
    check=_check,
    alloc=_alloc,
    ref=_ref.hadamard,
    example=lambda device: (torch.randn(8, 256, device=device), -1),
)


def hadamard(x: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
    """Normalized fast Walsh-Hadamard transform over the last dimension.

    Args:
        x: ``[..., n]`` float32, float16, bfloat16 or float64; any strides.
        block_size: ``None`` to transform the whole last dimension (``n`` must be a power of two), or
            a power of two dividing ``n`` for the block-diagonal transform (each run of
            ``block_size`` elements transformed on its own).

    Returns:
        A new contiguous tensor shaped and typed like ``x``: ``x @ H / sqrt(b)`` per block, with ``H``
        the Sylvester (natural-order) Hadamard matrix of size ``b``, which is symmetric and
        orthonormal after scaling, so applying it twice gives ``x`` back. Computed in fp32
        (fp64 for float64 input) and rounded once to ``x``'s dtype.
    """
    return torch.ops.calibra.hadamard(x, -1 if block_size is None else int(block_size))
