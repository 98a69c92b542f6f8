"""Reference for calibra::gptq_block_sweep: GPTQ's sequential column sweep over one block (the
oracle of the native kernels, and the "pure-torch reference sweep" of the benchmark), and for its
sibling calibra::sparsegpt_block_sweep (the same sweep choosing SparseGPT's N:M mask inside it, see
:func:`nm_keep`).

Parameter fitting (``fit_params``), per row over a run of L columns ``x [R, L]``, for each clipping
candidate ``p`` in ``shrink`` (the first strictly lower squared error wins; ``shrink = [1]`` is plain
min/max):

- ``int``: mn = min(min x, 0) * p, mx = max(max x, 0) * p; scale and zero exactly as
  :mod:`calibra.ops._ref.quantize` (scale rounded to ``scale_dtype``, a stored 0 becomes 1);
  code = clamp(rne(x / s) + zero, 0, maxq), value = (code - zero) * s.
- ``nvfp4``: a = amax * p; stored scale S = e4m3((a / 6) * global_scale); d = S / global_scale;
  code = e2m1(x / d) (0 where d == 0); value = e2m1(code) * d.
- ``mxfp4``: a = amax * p; S = 2^(floor(log2 a) - 2) (0 when a == 0); d = S / global_scale (= S,
  global_scale is 1); codes and values as nvfp4.
- ``none``: S = 1, zero = 0, value = x, code 0 (SparseGPT without quantization).

The squared error of a candidate is summed column by column in order (``sequential=True``), as the
native kernels do, so the choice is identical; bulk fits (static groups, RTN) may sum in any order.
"""

from __future__ import annotations

import torch

from calibra.ops._ref.quantize import e2m1_decode, e2m1_encode, exp2_int, mx_exponent

FORMATS = ("int", "mxfp4", "nvfp4", "none")


def quantize_values(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: str, bits: int, global_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8) and values (fp32) of fp32 ``x [..]`` with per-element-broadcast params."""
    if fmt == "none":
        return torch.zeros(x.shape, dtype=torch.uint8, device=x.device), x.clone()
    if fmt == "int":
        maxq = float(2**bits - 1)
        q = (torch.round((x / scale).clamp(-4194304.0, 4194304.0)) + zero).clamp(0.0, maxq)
        return q.to(torch.uint8), (q - zero) * scale
    d = scale / torch.tensor(global_scale, dtype=torch.float32, device=x.device)
    codes = e2m1_encode(x / d)
    codes = torch.where(d == 0, torch.zeros_like(codes), codes)
    return codes, e2m1_decode(codes) * d


def fit_params(
    x: torch.Tensor,
    fmt: str,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype,
    global_scale: float,
    shrink: torch.Tensor,
    sequential: bool = True,
):
    """Fitted (scale [R], zero [R]) fp32 of each row of fp32 ``x [R, L]``; see the module doc."""
    rows, n = x.shape
    x = x.float()
    if fmt == "none":
        return x.new_ones(rows), x.new_zeros(rows)
    mn = x.amin(1).clamp(max=0.0) if n else x.new_zeros(rows)
    mx = x.amax(1).clamp(min=0.0) if n else x.new_zeros(rows)
    maxq = float(2**bits - 1)
    gs = torch.tensor(global_scale, dtype=torch.float32, device=x.device)
    best = None
    for p in shrink.float().to(x.device).unbind(0):
        if fmt == "int":
            mnp, mxp = mn * p, mx * p
            raw = (2.0 * torch.maximum(-mnp, mxp)) / maxq if symmetric else (mxp - mnp) / maxq
            s = raw.to(scale_dtype)
            s = torch.where(s == 0, torch.ones_like(s), s).float()
            z = torch.full_like(s, (maxq + 1) / 2) if symmetric else torch.round(-mnp / s).clamp(0.0, maxq)
        else:
            a = torch.maximum(-mn, mx) * p
            if fmt == "nvfp4":
                s = ((a / 6.0) * gs).to(torch.float8_e4m3fn).float()
            else:
                s = torch.where(a == 0, torch.zeros_like(a), exp2_int(mx_exponent(a)))
            z = torch.zeros_like(s)
        if shrink.numel() == 1:
            return s, z
        _, v = quantize_values(x, s[:, None], z[:, None], fmt, bits, global_scale)
        diff = v - x
        if sequential:
            e = x.new_zeros(rows)
            for j in range(n):
                e = e + diff[:, j] * diff[:, j]
        else:
            e = (diff * diff).sum(1)
        if best is None:
            best = [s, z, e]
        else:
            better = e < best[2]
            best = [torch.where(better, s, best[0]), torch.where(better, z, best[1]), torch.where(better, e, best[2])]
    return best[0], best[1]


def _check_data(group: torch.Tensor, fit: torch.Tensor, g: int) -> None:
    c = group.numel()
    if c and (int(group.min()) < 0 or int(group.max()) >= g):
        raise ValueError(
            f"[gptq_block_sweep] group entries must be in [0, {g}), got range [{int(group.min())}, {int(group.max())}]"
        )
    cols = torch.arange(c, device=fit.device)
    if c and bool(((fit < 0) | (cols + fit.long() > c)).any()):
        raise ValueError(f"[gptq_block_sweep] fit[i] must be >= 0 with i + fit[i] <= {c} (fits stay in the block)")


def nm_keep(sal: torch.Tensor, n: int) -> torch.Tensor:
    """Keep-mask of ``sal [m, R]`` (one N:M group of m columns, rows along dim 1): per row the ``n`` most
    salient. Rank of element j = #{k: s_k > s_j} + #{k < j: s_k == s_j} (a stable descending order:
    among equal saliencies the lower index is kept, the higher pruned -- calibra::nm_mask's rule); keep
    rank < n. Plain float comparisons: a NaN is beaten by nothing (rank 0, kept) and beats nothing."""
    si = sal.unsqueeze(1)  # [k, 1, R]: the other element
    sj = sal.unsqueeze(0)  # [1, j, R]: the element being ranked
    m = sal.shape[0]
    idx = torch.arange(m, device=sal.device)
    lower = (idx[:, None] < idx[None, :])[:, :, None]  # [k, j, 1]: k comes before j
    rank = ((si > sj) | ((si == sj) & lower)).sum(0)  # [j, R]
    return rank < n


def _sweep(w, u, scales, zeros, group, fit, mask, nm, shrink, bits, symmetric, format, scale_dtype, global_scale):
    """The column sweep shared by both ops: ``mask`` uint8 [R, C] (may be empty) fixed up front, or ``nm``
    = (n, m) chosen at each group's first column from the current weights' ``x^2 / u_ii^2``."""
    _check_data(group, fit, scales.shape[1])
    x = w.float().clone()
    rows, c = x.shape
    table_s = scales.float().clone()
    table_z = zeros.float().clone()
    q = torch.empty_like(x)
    codes = torch.empty((rows, c), dtype=torch.uint8, device=x.device)
    err = torch.empty_like(x)
    prune = mask != 0 if mask.numel() else None
    if nm is not None:
        prune = torch.zeros((rows, c), dtype=torch.bool, device=x.device)
    d = u.diagonal()
    groups, fits = group.tolist(), fit.tolist()
    for i in range(c):
        if nm is not None and i % nm[1] == 0:
            n, m = nm
            # saliency x^2 / (u_ii * u_ii), per element: square, square, divide (as the kernels)
            sal = (x[:, i : i + m] * x[:, i : i + m]) / (d[i : i + m] * d[i : i + m])[None, :]
            prune[:, i : i + m] = ~nm_keep(sal.t(), n).t()
        g = groups[i]
        if fits[i] > 0:
            s, z = fit_params(x[:, i : i + fits[i]], format, bits, symmetric, scale_dtype, global_scale, shrink)
            table_s[:, g] = s
            table_z[:, g] = z
        col_codes, col = quantize_values(x[:, i], table_s[:, g], table_z[:, g], format, bits, global_scale)
        if prune is not None:
            pm = prune[:, i]
            col = torch.where(pm, torch.zeros_like(col), col)
            zero_code = table_z[:, g].to(torch.uint8) if format == "int" else torch.zeros_like(col_codes)
            col_codes = torch.where(pm, zero_code, col_codes)
        e = (x[:, i] - col) / u[i, i]
        q[:, i] = col
        codes[:, i] = col_codes
        err[:, i] = e
        if i + 1 < c:
            x[:, i + 1 :] -= e[:, None] * u[i, i + 1 :][None, :]
    return q, codes, err, table_s, table_z, prune


def gptq_block_sweep(w, u, scales, zeros, group, fit, mask, shrink, bits, symmetric, format, scale_dtype, global_scale):
    return _sweep(
        w, u, scales, zeros, group, fit, mask, None, shrink, bits, symmetric, format, scale_dtype, global_scale
    )[:5]


def sparsegpt_block_sweep(
    w, u, scales, zeros, group, fit, shrink, n, m, bits, symmetric, format, scale_dtype, global_scale
):
    """calibra::sparsegpt_block_sweep: the same sweep with SparseGPT's N:M selection inside it; the
    sixth output is the chosen prune mask (bool [R, C], True = pruned)."""
    return _sweep(
        w,
        u,
        scales,
        zeros,
        group,
        fit,
        torch.empty(0, dtype=torch.uint8, device=w.device),
        (n, m),
        shrink,
        bits,
        symmetric,
        format,
        scale_dtype,
        global_scale,
    )
