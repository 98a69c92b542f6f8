"""References for calibra::pack / calibra::unpack: the dense LSB-first bit stream written out bit by
bit in plain torch. Slow on purpose -- every bit is a tensor element -- so the layout is obvious.

Layout (per line along ``dim``): element ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, its
least significant bit first; word ``k`` holds stream bits ``[k*wb, (k+1)*wb)`` with stream bit
``k*wb + j`` at bit ``j`` of the word (wb = 32 for int32 words, 8 for uint8). Trailing bits are zero.
"""

from __future__ import annotations

import torch


def word_bits(word: torch.dtype) -> int:
    return 32 if word == torch.int32 else 8


def code_error_message(codes: torch.Tensor, bits: int, r: int, c: int) -> str:
    """The message for a code that does not fit in ``bits`` (shared with the CUDA path)."""
    return f"[pack] codes must be < 2**bits (found {int(codes[r, c])} at row {r}, col {c})"


def check_codes(codes: torch.Tensor, bits: int) -> None:
    bad = codes.to(torch.int32) >= (1 << bits)
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        raise ValueError(code_error_message(codes, bits, r, c))


def _pack_rows(codes: torch.Tensor, bits: int, wb: int) -> torch.Tensor:
    """codes [L, n] -> words [L, ceil(n*bits/wb)] as int64 values in [0, 2**wb)."""
    lines, n = codes.shape
    nw = -(-n * bits // wb)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(lines, n * bits)  # bit i*bits+j = bit j of code i
    padded = torch.zeros(lines, nw * wb, dtype=torch.uint8, device=codes.device)
    padded[:, : n * bits] = stream
    padded = padded.reshape(lines, nw, wb)
    words = torch.zeros(lines, nw, dtype=torch.int64, device=codes.device)
    for j in range(wb):
        words |= padded[:, :, j].to(torch.int64) << j
    return words


def pack(codes: torch.Tensor, bits: int, dim: int, word: torch.dtype) -> torch.Tensor:
    check_codes(codes, bits)
    wb = word_bits(word)
    lines = codes if dim in (1, -1) else codes.t()
    words = _pack_rows(lines, bits, wb)
    if wb == 32:
        words = torch.where(words >= 2**31, words - 2**32, words)  # the uint32 bit pattern as int32
    out = words.to(word)
    return out if dim in (1, -1) else out.t().contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int, length: int) -> torch.Tensor:
    wb = word_bits(words.dtype)
    lines = words if dim in (1, -1) else words.t()
    nl, nw = lines.shape
    w = lines.to(torch.int64) & ((1 << wb) - 1)
    shifts = torch.arange(wb, dtype=torch.int64, device=words.device)
    stream = ((w.unsqueeze(-1) >> shifts) & 1).reshape(nl, nw * wb)[:, : length * bits]
    stream = stream.reshape(nl, length, bits)
    weights = torch.tensor([1 << j for j in range(bits)], dtype=torch.int64, device=words.device)
    codes = (stream * weights).sum(-1).to(torch.uint8)
    return codes if dim in (1, -1) else codes.t().contiguous()
