"""calibra::pack / calibra::unpack -- dense LSB-first bit packing of integer codes into words.

One layout serves every export format (docs: ../shared/FORMATS.md):

- GPTQ ``qweight`` (int32 ``[in*bits/32, out]``, packed along the input dim) is
  ``pack(codes.T, bits, dim=0)`` of ``[out, in]`` codes; 3-bit packs 32 rows into 3 words with codes
  straddling word boundaries, exactly as here. GPTQ ``qzeros`` is ``pack(zeros, bits, dim=1)``.
- compressed-tensors ``pack-quantized`` ``weight_packed`` (int32 ``[out, ceil(in*bits/32)]``) is
  ``pack(codes, bits)``; its asymmetric ``weight_zero_point`` is ``pack(zp, bits, dim=0)``.
- NVFP4 / FP4 bytes (two codes per byte, even index in the low nibble) are
  ``pack(codes, 4, word=torch.uint8)``.
- MLX ``weight`` (uint32 ``[out, in*bits/32]``) is ``pack(codes, bits).view(torch.uint32)``.

Data errors on CUDA: a code >= 2**bits cannot be found by a shape-only check, and native kernels
never allocate. The CUDA kernel therefore takes the registry's data-error flag
(:func:`calibra.ops._registry.cuda_data_error`) and writes the row-major index of the first bad
element into it with an atomic min; the adapter reads it back and raises the same ValueError as the
CPU kernel and the reference.
"""

from __future__ import annotations

import torch

from calibra.ops import _ref
from calibra.ops._checks import check_dtype, check_range, check_rank
from calibra.ops._ref.pack import code_error_message, word_bits
from calibra.ops._registry import cuda_data_error, define

_WORDS = (torch.int32, torch.uint8)


def _line_dim(op: str, dim: int) -> int:
    if dim not in (-1, 0, 1):
        raise ValueError(f"[{op}] dim must be 0, 1 or -1, got {dim}")
    return 1 if dim == -1 else dim


def _pack_check(codes: torch.Tensor, bits: int, dim: int, word: torch.dtype) -> None:
    check_rank("pack", "codes", codes, rank=2)
    check_dtype("pack", "codes", codes, torch.uint8)
    check_range("pack", "bits", bits, 1, 8)
    _line_dim("pack", dim)
    if word not in _WORDS:
        raise TypeError(f"[pack] word must be torch.int32 or torch.uint8, got {word}")


def _pack_alloc(codes: torch.Tensor, bits: int, dim: int, word: torch.dtype) -> torch.Tensor:
    d = _line_dim("pack", dim)
    wb = word_bits(word)
    r, c = codes.shape
    shape = (r, -(-c * bits // wb)) if d == 1 else (-(-r * bits // wb), c)
    return torch.empty(shape, dtype=word, device=codes.device)


def _unpack_check(words: torch.Tensor, bits: int, dim: int, length: int) -> None:
    check_rank("unpack", "words", words, rank=2)
    check_dtype("unpack", "words", words, _WORDS)
    check_range("unpack", "bits", bits, 1, 8)
    d = _line_dim("unpack", dim)
    if length < 0:
        raise ValueError(f"[unpack] length must be >= 0, got {length}")
    wb = word_bits(words.dtype)
    need = -(-length * bits // wb)
    have = words.shape[d]
    if have != need:
        raise ValueError(
            f"[unpack] words has {have} words along dim {d}, but length {length} at {bits} bits "
            f"needs ceil({length}*{bits}/{wb}) = {need}"
        )


def _unpack_alloc(words: torch.Tensor, bits: int, dim: int, length: int) -> torch.Tensor:
    d = _line_dim("unpack", dim)
    shape = (words.shape[0], length) if d == 1 else (length, words.shape[1])
    return torch.empty(shape, dtype=torch.uint8, device=words.device)


define(
    "pack",
    "(Tensor codes, int bits, int dim, ScalarType word) -> Tensor",
    check=_pack_check,
    alloc=_pack_alloc,
    ref=_ref.pack,
    example=lambda device: (torch.randint(0, 8, (16, 100), dtype=torch.uint8, device=device), 3, 1, torch.int32),
)
define(
    "unpack",
    "(Tensor words, int bits, int dim, int length) -> Tensor",
    check=_unpack_check,
    alloc=_unpack_alloc,
    ref=_ref.unpack,
    example=lambda device: (torch.randint(-(2**31), 2**31 - 1, (8, 10), dtype=torch.int32, device=device), 5, 0, 50),
)


def pack(codes: torch.Tensor, bits: int, *, dim: int = -1, word: torch.dtype = torch.int32) -> torch.Tensor:
    """Pack integer codes into words as a dense LSB-first bit stream along ``dim``.

    Args:
        codes: ``[R, C]`` uint8, any strides (a transposed view is fine). Every code must be
            ``< 2**bits`` (ValueError naming the first offender otherwise).
        bits: code width, 1..8.
        dim: the dim packed along (0, 1, or -1 = 1). Each line along ``dim`` is its own stream.
        word: ``torch.int32`` (32-bit words, the uint32 bit pattern stored as int32) or ``torch.uint8``.

    Returns:
        ``[R, ceil(C*bits/wb)]`` for dim 1, ``[ceil(R*bits/wb), C]`` for dim 0 (wb = 32 or 8),
        contiguous. Element ``i`` of a line sits at stream bits ``[i*bits, (i+1)*bits)``, LSB first;
        word ``k`` holds stream bits ``[k*wb, (k+1)*wb)``, so 3/5/6/7-bit codes straddle word
        boundaries (GPTQ's 3-bit layout, compressed-tensors' dense packing). Trailing bits are zero.
    """
    return torch.ops.calibra.pack(codes, int(bits), int(dim), word)


def unpack(words: torch.Tensor, bits: int, *, length: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack`: ``[R, nw]`` / ``[nw, C]`` int32 or uint8 words -> uint8 codes with
    ``length`` elements along ``dim``. The word count along ``dim`` must be ``ceil(length*bits/wb)``;
    trailing bits past the last code are ignored."""
    return torch.ops.calibra.unpack(words, int(bits), int(dim), int(length))


# CUDA reports codes >= 2**bits through the data-error flag (see _registry.cuda_data_error).
@cuda_data_error("pack")
def _pack_cuda_error(index: int, codes: torch.Tensor, bits: int, dim: int, word: torch.dtype) -> None:
    r, c = divmod(index, codes.shape[1])
    raise ValueError(code_error_message(codes, bits, r, c))
