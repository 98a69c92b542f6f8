"""References for calibra::nm_mask, calibra::compress_24 and calibra::decompress_24, in plain torch.

nm_mask ranks every element of a group of ``m`` by pairwise comparison (O(m^2) per group): the rank
of element ``j`` is the number of elements with a larger score plus the number of elements with an
equal score and a lower index -- a stable descending order -- and the ``n`` lowest ranks are kept.
Float comparison makes -0.0 and +0.0 equal.
"""

from __future__ import annotations

import torch


def nan_error_message(index) -> str:
    """The message for a NaN score at ``index`` (a sequence of ints; shared with the CUDA path)."""
    return f"[nm_mask] scores must not contain NaN (found NaN at index [{', '.join(str(int(i)) for i in index)}])"


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    nan = torch.isnan(scores)
    if bool(nan.any()):
        raise ValueError(nan_error_message(nan.nonzero()[0].tolist()))
    k = scores.shape[-1]
    s = scores.float().reshape(-1, k // m, m)
    si = s.unsqueeze(-1)  # [..., i, 1]: the other element
    sj = s.unsqueeze(-2)  # [..., 1, j]: the element being ranked
    idx = torch.arange(m, device=scores.device)
    lower = idx.unsqueeze(-1) < idx.unsqueeze(0)  # [i, j]: i comes before j
    beats = (si > sj) | ((si == sj) & lower)
    rank = beats.sum(-2)  # [..., j]
    return (rank < n).reshape(scores.shape)


def not_24_message(r: int, c: int, count: int) -> str:
    return f"[compress_24] w is not 2:4 sparse: row {r}, columns {c}..{c + 3} hold {count} nonzeros"


def bad_meta_message(r: int, j: int, word: int, g: int) -> str:
    i0, i1 = (word >> (4 * g)) & 3, (word >> (4 * g + 2)) & 3
    return (
        f"[decompress_24] meta[{r}, {j}] = 0x{word:04x} is not valid 2:4 metadata: group {g} holds "
        f"indices {i0}, {i1}, which must be distinct and ascending"
    )


def compress_24(w: torch.Tensor):
    r, k = w.shape
    groups = w.reshape(r, k // 4, 4)
    nz = groups != 0  # -0.0 counts as zero, NaN as nonzero
    count = nz.sum(-1)
    if bool((count > 2).any()):
        gr, gg = (int(v) for v in (count > 2).nonzero()[0])
        raise ValueError(not_24_message(gr, 4 * gg, int(count[gr, gg])))
    # the nonzeros first, then the lowest unused indices; the two kept indices in ascending order
    key = (~nz).to(torch.int64) * 4 + torch.arange(4, device=w.device)
    kept = key.argsort(dim=-1)[..., :2].sort(dim=-1).values  # [r, k/4, 2]
    values = torch.gather(groups, -1, kept).reshape(r, k // 2)
    nib = kept[..., 0] | (kept[..., 1] << 2)  # [r, k/4]
    nib = nib.reshape(r, k // 16, 4)
    word = sum(nib[..., g] << (4 * g) for g in range(4))
    meta = torch.where(word >= 2**15, word - 2**16, word).to(torch.int16)
    return values, meta


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    r, kw = meta.shape
    word = meta.to(torch.int64) & 0xFFFF
    g = torch.arange(4, device=meta.device)
    nib = (word.unsqueeze(-1) >> (4 * g)) & 0xF  # [r, kw, 4]
    i0, i1 = nib & 3, nib >> 2
    bad = i0 >= i1
    if bool(bad.any()):
        br, bj, bg = (int(v) for v in bad.nonzero()[0])
        raise ValueError(bad_meta_message(br, bj, int(word[br, bj]), bg))
    idx = torch.stack((i0, i1), dim=-1).reshape(r, kw * 4, 2)
    out = torch.zeros(r, kw * 4, 4, dtype=values.dtype, device=values.device)
    out.scatter_(-1, idx, values.reshape(r, kw * 4, 2))
    return out.reshape(r, kw * 16)
