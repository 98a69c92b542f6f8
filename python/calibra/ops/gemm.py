"""Inference GEMMs for calibra-compressed weights and their load-time layout helpers.

- ``w4a16_repack(qweight)``: int4 codes packed as ``calibra.ops.pack(codes, 4)`` (int32 ``[N, K/8]``,
  compressed-tensors ``weight_packed``) -> the W4A16 tile layout (int32 ``[K/16, 2N]``).
- ``w4a16_gemm(x, tiled, scales, zeros, group_size)``: ``y = x @ dequant(W)^T`` with group-wise int4
  weights, fp16/bf16 activations (Marlin-style CUDA kernel; a plain CPU kernel elsewhere).
- ``sparse24_reorder_meta(meta)``: compress_24 metadata (int16 ``[N, K/16]``) -> the register order of
  ``mma.sp.m16n8k32`` (int32 ``[N/16, K/2]``).
- ``sparse24_gemm(x, values, meta_r)``: ``y = x @ W^T`` for a 2:4-sparse ``W`` given as compress_24
  values + reordered metadata (sparse tensor cores on CUDA).

Both layouts are specified in ``csrc/include/calibra/params/gemm.h`` and in
:mod:`calibra.ops._ref.gemm`. Use :func:`w4a16_prepare` / :func:`sparse24_prepare` to build the GEMM
operands from calibra's own tensors; ``calibra.nn`` wraps them as drop-in Linear modules.

On CUDA, small problems split K over several thread blocks; the partial sums go to a float32
workspace ``[splits, M, N]`` that the registry allocates here (``workspace=``), never in native code.
"""

from __future__ import annotations

import functools

import torch

from calibra.ops import _ref
from calibra.ops._checks import check_dtype, check_floating, check_rank, check_same_device
from calibra.ops._ref import gemm as _gref
from calibra.ops._registry import define

_ACT = (torch.float16, torch.bfloat16)
K_TILE = 64  # both CUDA GEMMs step K by 64: K % 64 == 0
# the CUDA kernels' block widths and smallest M tiles (params/gemm.h; tests/ops/test_gemm.py checks them)
W4A16_N_TILE, W4A16_M_TILE_MIN = 256, 16  # outputs per W4A16 thread block (4 warps x 64)
SPARSE24_N_TILE, SPARSE24_M_TILE_MIN = 128, 8  # outputs per 2:4 thread block (4 warps x 32)


# ---------------------------------------------------------------------------------------------
# w4a16_repack


def _repack_check(qweight: torch.Tensor) -> None:
    check_rank("w4a16_repack", "qweight", qweight, rank=2)
    check_dtype("w4a16_repack", "qweight", qweight, torch.int32)
    n, kw = qweight.shape
    if n % 64:
        raise ValueError(f"[w4a16_repack] out_features ({n}) must be a multiple of 64")
    if kw % 2:
        raise ValueError(f"[w4a16_repack] in_features ({8 * kw}) must be a multiple of 16")


def _repack_alloc(qweight: torch.Tensor) -> torch.Tensor:
    n, kw = qweight.shape
    return torch.empty((kw // 2, 2 * n), dtype=torch.int32, device=qweight.device)


# ---------------------------------------------------------------------------------------------
# w4a16_gemm


def _check_group(op: str, group_size: int, k: int) -> None:
    if group_size == -1:
        return
    if group_size <= 0 or k % group_size or not (group_size in (16, 32) or group_size % 64 == 0):
        raise ValueError(
            f"[{op}] group_size must be -1 (per channel), 16, 32 or a multiple of 64 dividing "
            f"in_features = {k}, got {group_size}"
        )


def _check_x(op: str, x: torch.Tensor) -> int:
    check_rank(op, "x", x, min_rank=1)
    check_floating(op, "x", x, _ACT)
    k = x.shape[-1]
    if k % K_TILE or k == 0:
        raise ValueError(f"[{op}] in_features ({k}) must be a multiple of {K_TILE}")
    return k


def _gemm_check(x, tiled, scales, zeros, group_size) -> None:
    op = "w4a16_gemm"
    k = _check_x(op, x)
    check_rank(op, "tiled", tiled, rank=2)
    check_dtype(op, "tiled", tiled, torch.int32)
    if tiled.shape[0] * 16 != k or tiled.shape[1] % 128:
        raise ValueError(
            f"[{op}] tiled {tuple(tiled.shape)} does not fit x with in_features {k}: expected "
            f"[{k // 16}, 2N] with N a multiple of 64 (see w4a16_repack)"
        )
    n = tiled.shape[1] // 2
    _check_group(op, group_size, k)
    g = 1 if group_size == -1 else k // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"[{op}] {name} must have x's dtype {x.dtype}, got {t.dtype}")
        if tuple(t.shape) != (g, n):
            raise ValueError(f"[{op}] {name} must be [groups, out_features] = [{g}, {n}], got {tuple(t.shape)}")
    check_same_device(op, x=x, tiled=tiled, scales=scales, **({} if zeros is None else {"zeros": zeros}))


def _gemm_alloc(x, tiled, *rest) -> torch.Tensor:
    return torch.empty((*x.shape[:-1], tiled.shape[1] // 2), dtype=x.dtype, device=x.device)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_k(m: int, n: int, k: int, sms: int, n_tile: int, m_tile_min: int) -> int:
    """How many K slices a CUDA GEMM uses: 1 when the (M, N) tiles already fill the GPU, otherwise
    enough slices for about two thread blocks per SM, each slice at least 4 K tiles long, at most 16.
    The rule is ``gemm_split_k`` of params/gemm.h (one copy, shared with the C++ benchmark)."""
    from calibra import _native

    cpu = _native.load("cpu")
    if cpu is None:
        raise RuntimeError(
            f"[gemm] the split-K rule lives in calibra._cpu, which did not load: {_native.load_failure('cpu')}"
        )
    return int(cpu.gemm_split_k(m, n, k, sms, n_tile, m_tile_min))


def _workspace(backend: str, x: torch.Tensor, n: int, n_tile: int, m_tile_min: int) -> list:
    if backend != "cuda":
        return []
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    s = split_k(m, n, k, _sm_count(x.device.index or 0), n_tile, m_tile_min)
    return [None if s == 1 else torch.empty((s, m, n), dtype=torch.float32, device=x.device)]


def _gemm_workspace(backend, x, tiled, *rest) -> list:
    return _workspace(backend, x, tiled.shape[1] // 2, W4A16_N_TILE, W4A16_M_TILE_MIN)


def _example_gemm(device):
    codes = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    qweight = _ref.pack(codes, 4, 1, torch.int32)
    tiled = _gref.w4a16_repack(qweight).to(device)
    scales = (torch.rand(4, 64) * 0.01 + 0.001).half().to(device)
    zeros = torch.randint(0, 16, (4, 64)).half().to(device)
    return torch.randn(3, 128).half().to(device), tiled, scales, zeros, 32


# ---------------------------------------------------------------------------------------------
# sparse24_reorder_meta / sparse24_gemm


def _reorder_check(meta: torch.Tensor) -> None:
    check_rank("sparse24_reorder_meta", "meta", meta, rank=2)
    check_dtype("sparse24_reorder_meta", "meta", meta, torch.int16)
    n, kw = meta.shape
    if n % 16:
        raise ValueError(f"[sparse24_reorder_meta] rows ({n}) must be a multiple of 16")
    if kw % 2:
        raise ValueError(f"[sparse24_reorder_meta] columns ({16 * kw}) must be a multiple of 32")


def _reorder_alloc(meta: torch.Tensor) -> torch.Tensor:
    n, kw = meta.shape
    return torch.empty((n // 16, 8 * kw), dtype=torch.int32, device=meta.device)


def _sp_check(x, values, meta_r) -> None:
    op = "sparse24_gemm"
    k = _check_x(op, x)
    check_rank(op, "values", values, rank=2)
    if values.dtype != x.dtype:
        raise TypeError(f"[{op}] values must have x's dtype {x.dtype}, got {values.dtype}")
    n = values.shape[0]
    if values.shape[1] * 2 != k or n % 16:
        raise ValueError(
            f"[{op}] values {tuple(values.shape)} must be [N, in_features/2] = [N, {k // 2}] with N a multiple of 16"
        )
    check_rank(op, "meta", meta_r, rank=2)
    check_dtype(op, "meta", meta_r, torch.int32)
    if tuple(meta_r.shape) != (n // 16, k // 2):
        raise ValueError(
            f"[{op}] meta must be [N/16, in_features/2] = [{n // 16}, {k // 2}] (sparse24_reorder_meta), "
            f"got {tuple(meta_r.shape)}"
        )
    check_same_device(op, x=x, values=values, meta=meta_r)


def _sp_alloc(x, values, meta_r) -> torch.Tensor:
    return torch.empty((*x.shape[:-1], values.shape[0]), dtype=x.dtype, device=x.device)


def _sp_workspace(backend, x, values, meta_r) -> list:
    return _workspace(backend, x, values.shape[0], SPARSE24_N_TILE, SPARSE24_M_TILE_MIN)


def _example_meta(device):
    w = torch.randn(32, 64)
    w.view(32, 16, 4)[:, :, 1:3] = 0
    return (_ref.compress_24(w)[1].to(device),)


def _example_sp(device):
    w = torch.randn(32, 128)
    w.view(32, 32, 4)[:, :, 0] = 0
    w.view(32, 32, 4)[:, :, 2] = 0
    w.view(32, 32, 4)[:, ::3, 3] = 0  # some groups keep a single nonzero
    values, meta = _ref.compress_24(w.half())
    return (torch.randn(5, 128).half().to(device), values.to(device), _gref.sparse24_reorder_meta(meta).to(device))


define(
    "w4a16_repack",
    "(Tensor qweight) -> Tensor",
    check=_repack_check,
    alloc=_repack_alloc,
    ref=_gref.w4a16_repack,
    example=lambda device: (torch.randint(-(2**31), 2**31 - 1, (128, 8), dtype=torch.int32, device=device),),
)
define(
    "w4a16_gemm",
    "(Tensor x, Tensor tiled, Tensor scales, Tensor? zeros, int group_size) -> Tensor",
    check=_gemm_check,
    alloc=_gemm_alloc,
    ref=_gref.w4a16_gemm,
    native_contiguous=True,
    example=_example_gemm,
    workspace=_gemm_workspace,
)
define(
    "sparse24_reorder_meta",
    "(Tensor meta) -> Tensor",
    check=_reorder_check,
    alloc=_reorder_alloc,
    ref=_gref.sparse24_reorder_meta,
    example=_example_meta,
)
define(
    "sparse24_gemm",
    "(Tensor x, Tensor values, Tensor meta) -> Tensor",
    check=_sp_check,
    alloc=_sp_alloc,
    ref=_gref.sparse24_gemm,
    native_contiguous=True,
    example=_example_sp,
    workspace=_sp_workspace,
)


# ---------------------------------------------------------------------------------------------
# public API


def w4a16_repack(qweight: torch.Tensor) -> torch.Tensor:
    """Re-lay int4 weights for :func:`w4a16_gemm` (done once, at load time).

    Args:
        qweight: int32 ``[N, K/8]``, ``calibra.ops.pack(codes, 4)`` of uint8 codes ``[N, K]`` (code of
            input ``k`` at bits ``4*(k%8)`` of word ``k/8``; compressed-tensors ``weight_packed``). Any
            strides. ``N % 64 == 0``, ``K % 16 == 0``.

    Returns:
        int32 ``[K/16, 2N]`` in the W4A16 tile layout (see :mod:`calibra.ops._ref.gemm`).
    """
    return torch.ops.calibra.w4a16_repack(qweight)


def w4a16_gemm(
    x: torch.Tensor, tiled: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """``y = x @ W^T`` with ``W[n, k] = (code - z) * scale`` (rounded once to x's dtype), fp32 accumulation.

    Args:
        x: ``[..., K]`` float16 / bfloat16; ``K % 64 == 0``.
        tiled: int32 ``[K/16, 2N]`` from :func:`w4a16_repack`.
        scales: ``[G, N]`` in x's dtype (G = K / group_size; 1 for ``group_size=-1``).
        zeros: ``[G, N]`` in x's dtype holding the integer zero points (0..15), or None for symmetric
            weights (zero point 8, calibra's and GPTQ's symmetric convention).
        group_size: -1 (per output channel), 16, 32 or a multiple of 64 dividing K.

    Returns ``[..., N]`` in x's dtype. Equals :func:`calibra.ops._ref.gemm.w4a16_gemm` (dequantize, fp32
    matmul, one rounding) up to the order of the fp32 accumulation.
    """
    return torch.ops.calibra.w4a16_gemm(x, tiled, scales, zeros, int(group_size))


def sparse24_reorder_meta(meta: torch.Tensor) -> torch.Tensor:
    """compress_24 metadata int16 ``[N, K/16]`` -> the ``mma.sp.m16n8k32`` register order, int32
    ``[N/16, K/2]`` (word ``[rt, 16kq + 2g + h]`` = rows ``16rt+g`` (low 16 bits) and ``16rt+g+8`` (high)
    of column word ``2kq+h``). ``N % 16 == 0``, ``K % 32 == 0``."""
    return torch.ops.calibra.sparse24_reorder_meta(meta)


def sparse24_gemm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """``y = x @ W^T`` for a 2:4-sparse ``W [N, K]`` given as ``compress_24`` values ``[N, K/2]`` (x's
    dtype, float16 / bfloat16) and :func:`sparse24_reorder_meta` metadata; ``x [..., K]``, ``K % 64 == 0``,
    ``N % 16 == 0``. fp32 accumulation, one rounding to x's dtype."""
    return torch.ops.calibra.sparse24_gemm(x, values, meta)


# ---------------------------------------------------------------------------------------------
# building the operands from calibra's tensors


def w4a16_prepare(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    *,
    dtype: torch.dtype,
    symmetric: bool | None = None,
):
    """``(tiled, scales_t, zeros_t)`` for :func:`w4a16_gemm` from calibra's layout.

    Args:
        qweight: int32 ``[N, K/8]`` packed codes (``calibra.ops.pack(q.codes, 4)``).
        scales: ``[N, G]`` (any float dtype; converted to ``dtype``).
        zeros: uint8 ``[N, G]`` zero points (calibra's ``QuantizedTensor.zeros``), or None.
        dtype: the activation dtype (float16 / bfloat16).
        symmetric: drop the zeros when True; when None, drop them if every zero point is 8.
    """
    if dtype not in _ACT:
        raise TypeError(f"[w4a16_prepare] dtype must be float16 or bfloat16, got {dtype}")
    tiled = w4a16_repack(qweight)
    s = scales.t().to(dtype).contiguous()
    if zeros is not None and symmetric is None:
        symmetric = bool((zeros == 8).all())
    z = None if (zeros is None or symmetric) else zeros.t().to(dtype).contiguous()
    return tiled, s, z


def sparse24_prepare(w: torch.Tensor, *, dtype: torch.dtype | None = None):
    """``(values, meta)`` for :func:`sparse24_gemm` from a dense 2:4-sparse weight ``[N, K]``."""
    from calibra.ops.sparsity import compress_24

    dtype = w.dtype if dtype is None else dtype
    if dtype not in _ACT:
        raise TypeError(f"[sparse24_prepare] dtype must be float16 or bfloat16, got {dtype}")
    values, meta = compress_24(w.to(dtype))
    return values, sparse24_reorder_meta(meta)
