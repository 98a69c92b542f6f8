"""SparseGPT (Frantar & Alistarh, 2023) for one Linear: the OBS column sweep with the Hessian,
adaptive mask selection per block, lazy batch updates, and optional joint quantization.

Given ``W [out, in]`` and ``H = X^T X``:

1. Normalize, damp and factor, by GPTQ's own code (:mod:`calibra.quant.gptq`): ``U`` = upper Cholesky
   factor of ``(H + damp I)^-1`` with the damping ladder (``damp_percent``, then each ``damp_ladder``
   value, in float32 and then float64; past it, fail naming the module -- FAULTS 18). Dead channels
   (``H_jj == 0``) get ``H_jj = 1`` and ``W[:, j] = 0``: they never fire, so their weights do not affect
   the output and the channel is decoupled from the others (FAULTS 19).
2. For each block of ``block_size`` columns (the lazy batch):
   - mask selection, scored by OBS's saliency ``w^2 / U_jj^2`` of the block's current (error-updated)
     weights: unstructured -- the lowest ``k_b`` of the whole block, where ``k_b`` distributes the
     layer's ``round(sparsity * out * in)`` over the blocks by cumulative rounding, so the layer total
     is exact; block tiles -- the same over tile sums; N:M -- inside the sweep, for each group of m
     columns at the group's first column, keep the n most salient of the group per row (as the paper);
   - the sweep (:func:`torch_block_sweep`, the seam for a native sweep): column by column, zero the
     pruned weights (and quantize the kept ones in joint mode), scale the error by ``1 / U_ii`` and push
     it onto the block's remaining columns;
   - the lazy update of all later columns: ``W[:, end:] -= Err @ U[block, end:]`` (one GEMM).

Joint quantization follows :func:`calibra.ops.quantize`'s integer convention and the rules of the
GPTQ block sweep (``calibra::gptq_block_sweep``): per-row params fitted on the whole W before the
sweep for ``group_size = -1``, otherwise each group's params fitted from the current columns
``[i, i + group_size)`` at its first column; ``scale`` rounded to the weight's dtype (a stored 0 becomes
1); ``code = clamp(round(w / scale) + zero, 0, 2^bits - 1)``; a pruned weight gets the zero point's
code, whose value is exactly 0.

The native sweep (:func:`native_block_sweep`, the default): the torch sweep's arguments are those of
``calibra::gptq_block_sweep`` plus ``nm``. Unstructured and block masks are fixed at the block's start,
so ``calibra::gptq_block_sweep`` serves them with its ``mask`` input; N:M masks are chosen inside the
sweep, by its sibling ``calibra::sparsegpt_block_sweep``, which returns the mask it chose. Both equal
their pure-torch references (:mod:`calibra.ops._ref.gptq`) bit for bit. N:M ties: among equal
saliencies the lower column is kept (calibra::nm_mask's rule, in the torch sweep too). ``sweep=``
swaps the sweep per call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from calibra.mps import mps_semantics, on_host
from calibra.ops import QuantizedTensor, gptq_block_sweep, sparsegpt_block_sweep
from calibra.ops._ref.gptq import nm_keep
from calibra.ops.gptq import NMSweepResult
from calibra.prune.checks import check_layer
from calibra.prune.config import PruningConfig
from calibra.prune.patterns import NM, Block, prune_count
from calibra.prune.result import PrunedLayer, relative_output_error
from calibra.quant.gptq import SharedFactorizations, factored_hessian
from calibra.quant.validate import all_finite

_CODE_CLAMP = 4194304.0  # 2^22: keeps w / scale finite-and-exact before rounding (as the GPTQ sweep does)


# A block sweep's outputs (q, codes, err, scales, zeros, prune), whichever sweep ran: the native N:M
# sweep's own result type. In the unstructured and torch sweeps, codes are 0 unless quantizing jointly.
SweepOut = NMSweepResult
BlockSweep = Callable[..., SweepOut]


def fit_int_params(x: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype):
    """Per-row (scale, zero) fp32 of fp32 ``x [R, L]`` in calibra.ops.quantize's integer convention,
    with the scale rounded to ``scale_dtype`` (the dtype the scales are stored in)."""
    maxq = float(2**bits - 1)
    mn = x.amin(1).clamp(max=0.0)
    mx = x.amax(1).clamp(min=0.0)
    raw = (2.0 * torch.maximum(-mn, mx)) / maxq if sym else (mx - mn) / maxq
    s = raw.to(scale_dtype)
    s = torch.where(s == 0, torch.ones_like(s), s).float()
    z = torch.full_like(s, (maxq + 1) / 2) if sym else torch.round(-mn / s).clamp(0.0, maxq)
    return s, z


def quantize_column(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int):
    maxq = float(2**bits - 1)
    q = (torch.round((x / s).clamp(-_CODE_CLAMP, _CODE_CLAMP)) + z).clamp(0.0, maxq)
    return q, (q - z) * s


def torch_block_sweep(
    w: torch.Tensor,
    u: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group: torch.Tensor,
    fit: torch.Tensor,
    prune: torch.Tensor | None,
    nm: tuple[int, int] | None,
    bits: int,
    sym: bool,
    fmt: str,
    scale_dtype: torch.dtype,
) -> SweepOut:
    """SparseGPT's sweep over one block in pure torch (the reference of the native sweep).

    Args:
        w: float32 ``[R, C]``, the block after the earlier blocks' lazy updates (not modified).
        u: float32 ``[C, C]``, the block's diagonal block of U.
        scales, zeros: float32 ``[R, G]`` parameter table (per-row params, or placeholders fitted here).
        group: int ``[C]``, the table entry of each column; fit: int ``[C]``, ``fit[i] = L > 0`` fits entry
            ``group[i]`` at column ``i`` from the current columns ``[i, i + L)``.
        prune: bool ``[R, C]`` (True = set to 0) chosen at the block's start, or None with ``nm``.
        nm: ``(n, m)``: choose the mask in the sweep, per group of m columns, from ``w^2 / U_ii^2``
            (per row keep the n most salient; among equal saliencies the lower column is kept).
        bits, sym: the integer grid; fmt: ``"int"`` (joint) or ``"none"`` (prune only).
        scale_dtype: fitted scales are rounded to this dtype.
    """
    # Work on the transpose [C, R]: each column is then one contiguous row, and pushing a column's error
    # onto the later columns is one rank-1 update (BLAS ger) over contiguous memory.
    xt = w.t().contiguous()
    c, rows = xt.shape
    table_s, table_z = scales.clone(), zeros.clone()
    qt = torch.empty_like(xt)
    codes_t = torch.zeros((c, rows), dtype=torch.uint8, device=xt.device)
    err_t = torch.empty_like(xt)
    cut_t = torch.zeros((c, rows), dtype=torch.bool, device=xt.device) if prune is None else prune.t().contiguous()
    d = u.diagonal()
    groups, fits = group.tolist(), fit.tolist()
    for i in range(c):
        if nm is not None and i % nm[1] == 0:
            n, m = nm
            sal = xt[i : i + m].square() / d[i : i + m].square()[:, None]
            cut_t[i : i + m] = ~nm_keep(sal, n)
        col = xt[i]
        cut = cut_t[i]
        if fmt == "int":
            g = groups[i]
            if fits[i] > 0:
                table_s[:, g], table_z[:, g] = fit_int_params(xt[i : i + fits[i]].t(), bits, sym, scale_dtype)
            code, val = quantize_column(col, table_s[:, g], table_z[:, g], bits)
            val = val.masked_fill(cut, 0.0)
            codes_t[i] = torch.where(cut, table_z[:, g], code).to(torch.uint8)
        else:
            val = col.masked_fill(cut, 0.0)
        e = (col - val) / d[i]
        qt[i] = val
        err_t[i] = e
        if i + 1 < c:
            xt[i + 1 :].addr_(u[i, i + 1 :], e, alpha=-1.0)
    q, codes, err, prune = qt.t(), codes_t.t(), err_t.t(), cut_t.t()
    return SweepOut(q, codes, err, table_s, table_z, prune)


def native_block_sweep(w, u, scales, zeros, group, fit, prune, nm, bits, sym, fmt, scale_dtype) -> SweepOut:
    """The sweep through the native ops: a mask fixed at the block's start (unstructured, block tiles) is
    :func:`calibra.ops.gptq_block_sweep`'s ``mask`` input; N:M (``nm``) runs
    :func:`calibra.ops.sparsegpt_block_sweep`, which chooses the mask inside the sweep and returns it."""
    if nm is not None:
        return sparsegpt_block_sweep(
            w,
            u,
            scales=scales.float().contiguous(),
            zeros=zeros.float().contiguous(),
            group=group.to(torch.int32),
            fit=fit.to(torch.int32),
            n=nm[0],
            m=nm[1],
            bits=bits,
            symmetric=sym,
            format=fmt,
            scale_dtype=scale_dtype,
        )
    if prune is None:
        raise ValueError("[sparsegpt] the block sweep needs a prune mask or an N:M pattern")
    q, codes, err, s, z = gptq_block_sweep(
        w,
        u,
        scales=scales.float().contiguous(),
        zeros=zeros.float().contiguous(),
        group=group.to(torch.int32),
        fit=fit.to(torch.int32),
        mask=prune.to(torch.uint8).contiguous(),
        bits=bits,
        symmetric=sym,
        format=fmt,
        scale_dtype=scale_dtype,
    )
    return SweepOut(q, codes, err, s, z, prune)


def check_hessian(h, n_tokens, in_features: int, name: str) -> None:
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != (in_features, in_features):
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(
            f"[sparsegpt] the Hessian of {name} must be [in, in] = {(in_features, in_features)}, got {got}"
        )
    if h.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"[sparsegpt] the Hessian of {name} must be float32 or float64, got {h.dtype}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(
            f"[sparsegpt] {name} needs a Hessian from at least one token, got n_tokens={n_tokens!r}; "
            f"check that calibration data reached this module"
        )
    if not all_finite(h):
        raise ValueError(f"[sparsegpt] the Hessian of {name} contains NaN/Inf; check the calibration activations")
    if bool((h.diagonal() < 0).any()):
        raise ValueError(
            f"[sparsegpt] the Hessian of {name} has negative diagonal entries, which a sum X^T X "
            f"cannot have; pass the calibration Hessian sum of this module"
        )


def _sweep_block_size(config: PruningConfig, pattern) -> int:
    """block_size rounded down to a multiple of every unit that must not straddle two blocks (N:M
    groups, block tiles' columns, joint-quantization groups), and at least one such unit."""
    unit = 1
    if isinstance(pattern, NM):
        unit = pattern.m
    elif isinstance(pattern, Block):
        unit = pattern.cols
    if config.quantize is not None and config.quantize.group_size != -1:
        unit = math.lcm(unit, config.quantize.group_size)
    return max(config.block_size // unit, 1) * unit


def _select_block(sal: torch.Tensor, pattern, k: int) -> torch.Tensor:
    """Prune-mask (True = prune) of the ``k`` least salient weights (or tiles) of a block."""
    if isinstance(pattern, Block):
        tiles = pattern.tile_scores(sal)
        cut = torch.zeros(tiles.numel(), dtype=torch.bool, device=sal.device)
        if k:
            cut[torch.sort(tiles.reshape(-1), stable=True).indices[:k]] = True
        return pattern.expand(cut.reshape(tiles.shape))
    cut = torch.zeros(sal.numel(), dtype=torch.bool, device=sal.device)
    if k:
        cut[torch.sort(sal.reshape(-1), stable=True).indices[:k]] = True
    return cut.reshape(sal.shape)


def sparsegpt_prune(
    w: torch.Tensor,
    h: torch.Tensor,
    n_tokens: int,
    config: PruningConfig,
    *,
    name: str = "weight",
    sparsity: float | None = None,
    prior: torch.Tensor | None = None,
    sweep: BlockSweep | None = None,
    measure: bool = True,
    shared: SharedFactorizations | None = None,
) -> PrunedLayer:
    """SparseGPT of ``w [out, in]`` with the Hessian sum ``h = X^T X`` over ``n_tokens`` tokens.

    ``w`` and ``h`` are not modified. ``sparsity`` overrides the target (gradual steps; not for N:M);
    ``prior`` is a keep-mask whose pruned entries stay pruned; ``sweep`` replaces the block sweep (default
    :func:`native_block_sweep`, native for every pattern; pass ``torch_block_sweep`` for the pure-torch
    reference); ``measure=False`` skips the reconstruction
    error (a GEMM). ``shared``: weights that read the same ``h`` (q/k/v) factor it once (same results).
    """
    t0 = time.perf_counter()
    config.validate()
    check_layer(w, config, name)
    check_hessian(h, n_tokens, w.shape[1], name)
    pattern = config.pattern_obj
    nm = (pattern.n, pattern.m) if isinstance(pattern, NM) else None
    if nm is not None and prior is not None:
        raise ValueError("[sparsegpt] a prior mask cannot be combined with an N:M pattern (its sparsity is fixed)")
    s = config.sparsity if sparsity is None else float(sparsity)
    out, n = w.shape
    wf = w.detach().float().clone()
    fh = factored_hessian(h, n_tokens, wf, config, subject=f"[sparsegpt] the Hessian of {name}", shared=shared)
    fac, n_dead = fh.fac, int(fh.dead.sum())
    u = fac.u

    jq = config.quantize
    fmt = "int" if jq is not None else "none"
    bits, sym = (jq.bits, jq.sym) if jq is not None else (4, True)
    gs = jq.group_size if jq is not None else -1
    scale_dtype = w.dtype
    per_row = jq is not None and gs == -1
    if per_row:
        table_s, table_z = fit_int_params(wf, bits, sym, scale_dtype)
        table_s, table_z = table_s[:, None], table_z[:, None]
    bs = _sweep_block_size(config, pattern)
    sweep = sweep or native_block_sweep
    q = torch.empty_like(wf)
    codes = torch.zeros((out, n), dtype=torch.uint8, device=wf.device)
    keep = torch.ones((out, n), dtype=torch.bool, device=wf.device)
    dyn_s, dyn_z = [], []
    if isinstance(pattern, Block):
        unit_total = (out // pattern.rows) * (n // pattern.cols)
        units_before = lambda col: (out // pattern.rows) * (col // pattern.cols)  # noqa: E731
    else:
        unit_total = out * n
        units_before = lambda col: out * col  # noqa: E731
    total = prune_count(unit_total, s)
    loss = 0.0
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        c = i2 - i1
        w1 = wf[:, i1:i2]
        u1 = u[i1:i2, i1:i2]
        cut = None
        if nm is None:
            # cumulative rounding: the blocks' counts add up to the layer's rounded total exactly
            k = round(total * units_before(i2) / unit_total) - round(total * units_before(i1) / unit_total)
            sal = w1.square() / u1.diagonal().square()[None, :]
            if prior is not None:
                sal = sal.masked_fill(~prior[:, i1:i2], float("-inf"))
            cut = _select_block(sal, pattern, k)
        if per_row:
            s_in, z_in = table_s, table_z
            grp = torch.zeros(c, dtype=torch.int32)
            fit = torch.zeros(c, dtype=torch.int32)
        elif jq is not None:
            s_in = torch.zeros((out, c // gs), dtype=torch.float32, device=wf.device)
            z_in = torch.zeros_like(s_in)
            grp = torch.arange(c, dtype=torch.int32) // gs
            fit = torch.zeros(c, dtype=torch.int32)
            fit[::gs] = gs
        else:
            s_in = torch.ones((out, 1), dtype=torch.float32, device=wf.device)
            z_in = torch.zeros_like(s_in)
            grp = torch.zeros(c, dtype=torch.int32)
            fit = torch.zeros(c, dtype=torch.int32)
        res = sweep(w1.contiguous(), u1.contiguous(), s_in, z_in, grp, fit, cut, nm, bits, sym, fmt, scale_dtype)
        q[:, i1:i2] = res.q
        codes[:, i1:i2] = res.codes
        keep[:, i1:i2] = ~res.prune
        if mps_semantics(res.err.device):  # MPS has no float64: the loss is summed on the CPU
            with on_host():
                loss += float((res.err.cpu().double() ** 2).sum()) / 2
        else:
            loss += float((res.err.double() ** 2).sum()) / 2
        if jq is not None and not per_row:
            dyn_s.append(res.scales)
            dyn_z.append(res.zeros)
        if i2 < n:
            wf[:, i2:].addmm_(res.err, u[i1:i2, i2:], alpha=-1.0)

    weight = q.to(w.dtype)
    quantized = None
    if jq is not None:
        ts, tz = (table_s, table_z) if per_row else (torch.cat(dyn_s, 1), torch.cat(dyn_z, 1))
        quantized = QuantizedTensor(
            codes=codes,
            scales=ts.to(scale_dtype).contiguous(),
            zeros=tz.to(torch.uint8).contiguous(),
            global_scale=None,
            bits=bits,
            group_size=gs,
            symmetric=sym,
            format="int",
            shape=(out, n),
            dtype=w.dtype,
        )
    err = relative_output_error(w, weight, h) if measure else None
    return PrunedLayer(
        name=name,
        method="sparsegpt",
        pattern=str(pattern),
        weight=weight,
        mask=keep,
        target_sparsity=s,
        achieved_sparsity=1.0 - float(keep.sum()) / keep.numel(),
        reconstruction_error=err,
        seconds=time.perf_counter() - t0,
        quantized=quantized,
        damp=fac.damp,
        dead_channels=n_dead,
        extra={
            "damp_percent": fac.damp_percent,
            "ladder_steps": fac.steps,
            "float64": fac.float64,
            "block_size": bs,
            "loss": loss,
            "samples": n_tokens,
        },
    )
