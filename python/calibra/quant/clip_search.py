"""Clipping searched against the layer's output error instead of the weight error.

AutoGPTQ's MSE clipping (``mse_clip``) picks, per group, the shrink factor of the range with the least
*weight* squared error. On a layer whose inputs have outlier channels that is the wrong objective: the
few columns that carry most of the activation energy dominate the output error, and a clip that trades
their error for a smaller error on the quiet columns can make the layer's output several times worse
than no clip at all. Here each candidate is scored by the error weighted per input column:

- RTN and groups fitted before a GPTQ sweep (static groups, per-channel): the Hessian's diagonal
  ``diag(X^T X)`` -- each input channel's activation energy, so ``sum_j d_j (w_j - q_j)^2`` is the
  output error when the channels are uncorrelated;
- groups fitted inside the GPTQ sweep: ``1 / U[j, j]^2`` (U the Cholesky factor of the damped H^-1),
  the weight GPTQ's own loss gives column j's error once the later columns compensate it.

The candidates are the config's shrink grid, whose first entry is 1 (no clip) and which wins ties, so
no group's weighted error grows. The cross-channel terms of H are not in the per-group score, so the
solvers also measure the whole layer's output error ``tr((W - Q) H (W - Q)^T)`` (:func:`output_error`)
against the unclipped result and keep the unclipped one when the clip did not help (the guard).
"""

from __future__ import annotations

import contextlib

import torch

from calibra.mps import mps_semantics, on_host
from calibra.ops.gptq import fit_group_params, quantize_with_params
from calibra.quant._tables import pad_columns
from calibra.quant.config import CLIP_METRICS


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T) / tr(W H W^T)`` in float64: the layer's relative output error on the
    calibration inputs (``h = X^T X``, any positive scale). 0 when the layer's output is identically 0."""
    host = mps_semantics(w.device)  # MPS has no float64: the traces are taken on the CPU
    with on_host() if host else contextlib.nullcontext():
        if host:
            w, q, h = w.cpu(), q.cpu(), h.cpu()
        h64 = h.double().to(w.device)
        wd = w.double()
        d = wd - q.double()
        num = float(((d @ h64) * d).sum())
        den = float(((wd @ h64) * wd).sum())
    return num / den if den > 0 else 0.0


def column_energy(h: torch.Tensor, device) -> torch.Tensor:
    """float32 per-input-channel weights ``diag(H) / mean(diag H)`` (the scale only keeps them near 1)."""
    d = h.diagonal().detach().to(device=device, dtype=torch.float32).clamp(min=0.0)
    m = float(d.mean()) if d.numel() else 0.0
    return d / m if m > 0 else torch.ones_like(d)


_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# the nearest E2M1 magnitude's index counts the midpoints below |y|: ties go to the even code, so the
# midpoints before an even code are passed with >, those before an odd code with >= (e2m1_encode's rule)
_MID_GT = (0.25, 1.25, 2.5, 5.0)
_MID_GE = (0.75, 1.75, 3.5)


def grid_values(x, scale, zero, fmt: str, bits: int, global_scale: float) -> torch.Tensor:
    """The dequantized values of fp32 ``x`` with broadcast params: :func:`calibra.ops.gptq.quantize_with_params`'s
    values (the same rounding), without the codes, in fewer passes (the clip search's inner loop)."""
    if fmt == "int":
        return quantize_with_params(x, scale, zero, format=fmt, bits=bits, global_scale=global_scale)[1]
    d = scale / torch.tensor(global_scale, dtype=torch.float32, device=x.device)
    y = x / d
    a = y.abs()
    gt = torch.tensor(_MID_GT, device=x.device)
    ge = torch.tensor(_MID_GE, device=x.device)
    idx = torch.bucketize(a, gt) + torch.bucketize(a, ge, right=True)  # #{m < a} + #{m <= a}
    mag = torch.tensor(_E2M1, device=x.device)[idx]
    v = torch.where(y < 0, -mag, mag) * d
    return torch.where(d == 0, torch.zeros_like(v), v)


CHUNK = 1 << 22
"""Elements scored per batched call (candidates x rows x group): bounds the search's temporaries."""


def fit_groups_weighted(
    w: torch.Tensor,
    group_size: int,
    col_weight: torch.Tensor,
    *,
    fmt: str,
    bits: int,
    sym: bool,
    scale_dtype: torch.dtype,
    global_scale: float,
    shrink: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) fp32 ``(scales, zeros) [out, G]`` of fp32 ``w [out, in]``: for each group the
    candidate of ``shrink`` with the least ``sum_j col_weight[j] * (w_j - q_j)^2``; a candidate replaces
    the best so far only when strictly lower, and the first (1.0, no clip) is tried first.

    ``shrink`` is the config's grid ``1 - k / grid`` (then any extra candidates such as MXFP4's 2.0). It is
    searched coarse to fine: every ``step``-th grid point and the extras, then each group's neighbours
    within ``step`` of its best grid point (about 16 + 2 x 4 scored candidates instead of 80; the error
    of a group against the shrink factor is near unimodal on this scale). Candidates are scored in
    batches (:data:`CHUNK` elements at a time)."""
    out, n = w.shape
    gs = n if group_size == -1 else group_size
    # a ragged last group: zero columns of zero weight complete it (exact: calibra.ops.quantize.ragged_pad)
    w = pad_columns(w.float(), gs)
    col_weight = pad_columns(col_weight.float().reshape(1, -1), gs).reshape(-1)
    g = w.shape[1] // gs if n else 0
    rows = out * g
    x = w.float().reshape(rows, gs)
    cw = col_weight.float().to(w.device).reshape(1, g, gs).expand(out, g, gs).reshape(rows, gs)
    ps = shrink.float().reshape(-1).tolist()
    n_grid = next((i for i, p in enumerate(ps) if i and p >= ps[i - 1]), len(ps))  # the decreasing run
    grid = torch.tensor(ps[:n_grid], dtype=torch.float32, device=w.device)
    fit_kw = dict(format=fmt, bits=bits, symmetric=sym, scale_dtype=scale_dtype, global_scale=global_scale)
    one = torch.ones(1, dtype=torch.float32)

    def best_of(p: torch.Tensor, r0: int, r1: int):
        """p [P, r] candidate factors per row of x[r0:r1]: (s, z, e, index into P) of the least error."""
        k, r = p.shape
        xr = x[r0:r1]
        # the params of x with its range scaled by p are those of x * p with no clip (min and max commute
        # with a positive factor exactly), so one fit call scores a different p per row
        s, z = fit_group_params((xr[None] * p[:, :, None]).reshape(k * r, gs), shrink=one, **fit_kw)
        s, z = s.reshape(k, r), z.reshape(k, r)
        v = grid_values(xr[None].expand(k, r, gs), s[:, :, None], z[:, :, None], fmt, bits, global_scale)
        e = ((v - xr[None]) ** 2 * cw[None, r0:r1]).sum(-1)  # [P, r]
        i = e.argmin(0)  # the first of equal minima: the earlier candidate wins ties
        pick = i[None]
        return s.gather(0, pick)[0], z.gather(0, pick)[0], e.gather(0, pick)[0], i

    step = max(1, n_grid // 16)
    coarse = [ps[k] for k in range(0, n_grid, step)] + ps[n_grid:]
    coarse_idx = list(range(0, n_grid, step)) + [-1] * (len(ps) - n_grid)  # grid index (-1: an extra)
    deltas = [d for k in range(1, step) for d in (-k, k)]
    best_s, best_z = torch.empty(rows, device=w.device), torch.empty(rows, device=w.device)
    per_call = max(1, CHUNK // max(1, gs * len(coarse)))
    for r0 in range(0, rows, per_call):
        r1 = min(rows, r0 + per_call)
        p = torch.tensor(coarse, dtype=torch.float32, device=w.device)[:, None].expand(len(coarse), r1 - r0)
        s, z, e, i = best_of(p, r0, r1)
        if deltas:
            centre = torch.tensor(coarse_idx, device=w.device)[i]
            on_grid = centre >= 0
            # the best grid point first (it keeps ties), then its neighbours; an extra re-scores itself
            cand = [centre] + [(centre + d).clamp(0, n_grid - 1) for d in deltas]
            extra_p = p.gather(0, i[None])[0]
            pf = torch.stack([torch.where(on_grid, grid[c.clamp(min=0)], extra_p) for c in cand])
            s, z, e, _ = best_of(pf, r0, r1)
        best_s[r0:r1], best_z[r0:r1] = s, z
    return best_s.reshape(out, g), best_z.reshape(out, g)


__all__ = ["CLIP_METRICS", "output_error", "column_energy", "fit_groups_weighted", "grid_values"]
