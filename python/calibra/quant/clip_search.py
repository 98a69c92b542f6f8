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
    within ``step`` of its best grid point (about 16 + 2 x 5 scored candidates instead of 80; the error
    of a group against the shrink factor is near unimodal on this scale)."""
    out, n = w.shape
    gs = n if group_size == -1 else group_size
    g = n // gs if n else 0
    wf = w.float()
    x = wf.reshape(out * g, gs)
    cw = col_weight.float().to(w.device).reshape(1, g, gs)
    ps = shrink.float().reshape(-1).tolist()
    n_grid = next((i for i, p in enumerate(ps) if i and p >= ps[i - 1]), len(ps))  # the decreasing run
    grid = torch.tensor(ps[:n_grid], dtype=torch.float32, device=w.device)
    one = torch.ones(1, dtype=torch.float32)

    def score(p_rows: torch.Tensor):
        # params of x with its range scaled by p per row: those of x * p with no clip (min/max commute
        # with a positive factor exactly), so one fit call serves a different p per group
        s, z = fit_group_params(
            x * p_rows[:, None],
            format=fmt,
            bits=bits,
            symmetric=sym,
            scale_dtype=scale_dtype,
            global_scale=global_scale,
            shrink=one,
        )
        _, v = quantize_with_params(x, s[:, None], z[:, None], format=fmt, bits=bits, global_scale=global_scale)
        e = (((v - x) ** 2).reshape(out, g, gs) * cw).sum(-1).reshape(-1)
        return s, z, e

    rows = out * g
    step = max(1, n_grid // 16)
    best_s = best_z = best_e = None
    best_i = torch.zeros(rows, dtype=torch.long, device=w.device)  # grid index of the best (-1: an extra)

    def offer(p_rows, idx):
        nonlocal best_s, best_z, best_e, best_i
        s, z, e = score(p_rows)
        if best_e is None:
            best_s, best_z, best_e = s, z, e
            return
        better = e < best_e
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_e, best_i = torch.where(better, e, best_e), torch.where(better, idx, best_i)

    for k in range(0, n_grid, step):
        offer(grid[k].expand(rows), torch.full((rows,), k, dtype=torch.long, device=w.device))
    for p in ps[n_grid:]:
        offer(torch.full((rows,), p, device=w.device), torch.full((rows,), -1, dtype=torch.long, device=w.device))
    if step > 1:
        centre = best_i.clone()
        on_grid = centre >= 0
        for d in [d for k in range(1, step) for d in (-k, k)]:
            idx = (centre + d).clamp(0, n_grid - 1)
            # groups whose best is an extra candidate re-score it (not strictly lower: nothing changes)
            p_rows = torch.where(on_grid, grid[idx], torch.tensor(ps[-1], device=w.device))
            offer(p_rows, torch.where(on_grid, idx, centre))
    return best_s.reshape(out, g), best_z.reshape(out, g)


__all__ = ["CLIP_METRICS", "output_error", "column_energy", "fit_groups_weighted"]
