"""References for the inference GEMMs and their layout helpers, in plain torch.

The layouts are defined in ``csrc/include/calibra/params/gemm.h`` (and docs/ARCHITECTURE.md); here each
is written as an explicit index map, so the rule can be read off the code:

W4A16 tile layout: ``tiled`` int32 ``[K/16, 2N]``; word ``[kt, 128*b + 4*lane + j]`` (b = 64-output block,
lane 0..31, j = 16-output sub-tile 0..3), nibble ``i = a + 4c`` holds
``code(n = 64b + 16j + g + 8*(a >> 1), k = 16kt + 2t + c + 8*(a & 1))`` with ``g = lane // 4``,
``t = lane % 4``.

2:4 metadata register layout: ``out`` int32 ``[N/16, K/2]``; word ``[rt, 16*kq + 2*g + h]`` is
``meta[16rt + g, 2kq + h] | meta[16rt + g + 8, 2kq + h] << 16`` (16-bit halves).
"""

from __future__ import annotations

import torch

from calibra.ops._ref.sparsity import decompress_24


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) -> int32 with the same bit pattern."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def unpack_int4_rows(qweight: torch.Tensor) -> torch.Tensor:
    """int32 ``[N, K/8]`` (calibra.ops.pack(codes, 4)) -> uint8 codes ``[N, K]``."""
    n, kw = qweight.shape
    shifts = 4 * torch.arange(8, device=qweight.device)
    codes = (qweight.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF
    return codes.reshape(n, kw * 8).to(torch.uint8)


def w4a16_tile_index(n_out: int, k_in: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For every nibble of the tiled layout, the (n, k) of the code it holds.

    Returns ``(n, k)``, each int64 ``[K/16, 2N, 8]``: entry ``[kt, w, i]`` is nibble ``i`` of word ``w`` of row ``kt``.
    """
    kt = torch.arange(k_in // 16, device=device).view(-1, 1, 1, 1, 1)
    b = torch.arange(n_out // 64, device=device).view(1, -1, 1, 1, 1)
    lane = torch.arange(32, device=device).view(1, 1, -1, 1, 1)
    j = torch.arange(4, device=device).view(1, 1, 1, -1, 1)
    i = torch.arange(8, device=device).view(1, 1, 1, 1, -1)
    g, t = lane // 4, lane % 4
    a, c = i % 4, i // 4
    n = 64 * b + 16 * j + g + 8 * (a >> 1)
    k = 16 * kt + 2 * t + c + 8 * (a & 1)
    shape = (k_in // 16, 2 * n_out, 8)
    n, k = torch.broadcast_tensors(n, k)
    return n.reshape(shape), k.reshape(shape)


def w4a16_repack(qweight: torch.Tensor) -> torch.Tensor:
    codes = unpack_int4_rows(qweight).to(torch.int64)  # [N, K]
    n_out, k_in = codes.shape
    n, k = w4a16_tile_index(n_out, k_in, qweight.device)
    nib = codes[n, k]  # [K/16, 2N, 8]
    word = (nib << (4 * torch.arange(8, device=qweight.device))).sum(-1)
    return _to_int32(word)


def w4a16_unrepack(tiled: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`w4a16_repack`: tiled int32 ``[K/16, 2N]`` -> uint8 codes ``[N, K]``."""
    kt16, n2 = tiled.shape
    n_out, k_in = n2 // 2, kt16 * 16
    n, k = w4a16_tile_index(n_out, k_in, tiled.device)
    nib = (tiled.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8, device=tiled.device))) & 0xF
    codes = torch.zeros(n_out, k_in, dtype=torch.int64, device=tiled.device)
    codes[n.reshape(-1), k.reshape(-1)] = nib.reshape(-1)
    return codes.to(torch.uint8)


def w4a16_dequantize(
    tiled: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """The dense ``[N, K]`` weight in the scales' dtype: ``(code - z) * scale`` rounded once
    (``scales``/``zeros`` ``[G, N]``; z = 8 without zeros)."""
    codes = w4a16_unrepack(tiled)
    n_out, k_in = codes.shape
    gs = k_in if group_size == -1 else group_size
    s = scales.float().t().repeat_interleave(gs, dim=1)  # [N, K]
    z = torch.full_like(s, 8.0) if zeros is None else zeros.float().t().repeat_interleave(gs, dim=1)
    return ((codes.float() - z) * s).to(scales.dtype)


def w4a16_gemm(
    x: torch.Tensor, tiled: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    w = w4a16_dequantize(tiled, scales, zeros, group_size)
    y = x.reshape(-1, x.shape[-1]).float() @ w.float().t()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def sparse24_reorder_meta(meta: torch.Tensor) -> torch.Tensor:
    n_out, kw = meta.shape
    m = meta.to(torch.int64) & 0xFFFF
    m = m.reshape(n_out // 16, 2, 8, kw // 2, 2)  # (rt, row half s, g, kq, h): row = 16rt + 8s + g
    word = m[:, 0] | (m[:, 1] << 16)  # (rt, g, kq, h)
    return _to_int32(word.permute(0, 2, 1, 3).reshape(n_out // 16, kw * 8))


def sparse24_unreorder_meta(meta_r: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`sparse24_reorder_meta`: int32 ``[N/16, K/2]`` -> int16 ``[N, K/16]``."""
    rt, half_k = meta_r.shape
    kw = half_k // 8
    w = (meta_r.to(torch.int64) & 0xFFFFFFFF).reshape(rt, kw // 2, 8, 2).permute(0, 2, 1, 3)  # (rt, g, kq, h)
    halves = torch.stack((w & 0xFFFF, w >> 16), dim=1)  # (rt, s, g, kq, h)
    m = halves.reshape(rt * 16, kw)
    return torch.where(m >= 2**15, m - 2**16, m).to(torch.int16)


def sparse24_gemm(x: torch.Tensor, values: torch.Tensor, meta_r: torch.Tensor) -> torch.Tensor:
    w = decompress_24(values, sparse24_unreorder_meta(meta_r))
    y = x.reshape(-1, x.shape[-1]).float() @ w.float().t()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
