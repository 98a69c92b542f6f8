"""GPTQ of one Linear: the lazy-batch column sweep over the Cholesky factor of the damped inverse
Hessian (Frantar et al., 2022), with every AutoGPTQ option (see :class:`GPTQConfig`).

Per block of columns, :func:`calibra.ops.gptq_block_sweep` (native) quantizes column by column and
returns the scaled errors; the later columns then get one GEMM, ``W[:, end:] -= Err @ U[block, end:]``.

Dead input channels (diag(H) == 0: the channel never fired) get H[i, i] = 1 and W[:, i] = 0, as the
GPTQ reference does: H^-1 then decouples the channel, so its weights quantize to exactly 0 and no
other column is touched. The damping base is the mean of diag(H) over live channels, so dead channels
do not change the damping of the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from calibra.mps import in_host_step, mps_semantics, on_host
from calibra.ops import gptq_block_sweep
from calibra.quant._tables import fit_groups, nvfp4_global_scale, stored_scales
from calibra.quant.clip_search import column_energy, fit_groups_weighted, output_error
from calibra.quant.config import GPTQConfig
from calibra.quant.result import ModuleLog, QuantizedLayer
from calibra.quant.validate import all_finite, check_hessian, check_weight


class Factorization(NamedTuple):
    """U (upper Cholesky factor of the damped H^-1) and how it was obtained."""

    u: torch.Tensor
    damp: float
    damp_percent: float
    steps: int
    float64: bool


@dataclass
class Factored:
    """What a solve derives from a Hessian alone (:func:`factored_hessian`)."""

    hessian: torch.Tensor  # the raw sum; held so no other Hessian can take its id while this is shared
    fac: Factorization
    base: float
    dead: torch.Tensor  # bool [in]: the dead input channels
    perm: torch.Tensor | None  # act-order's column order (sweep position -> input column)


class SharedFactorizations:
    """Factorizations of Hessians that several weights read: q/k/v share one Hessian, gate/up another.

    The damped inverse Hessian's factor depends only on the Hessian, its token count and the damping and
    act-order settings, so the first solve of a group factors and the others reuse its factor (and its
    dead channels and act-order permutation): the same U, hence the same bits, and one Cholesky and one
    n^3 triangular solve saved per extra reader. The readers of one Hessian are solved one after another,
    so only the latest factorization is kept (U, n^2 floats, alive until the next one or until the caller
    drops this)."""

    def __init__(self):
        self._entries: dict[tuple, Factored] = {}

    @staticmethod
    def key(h: torch.Tensor, n_tokens: int, config, device) -> tuple:
        return (
            id(h),
            h.data_ptr(),
            n_tokens,
            str(device),
            config.damp_percent,
            tuple(config.damp_ladder),
            bool(getattr(config, "desc_act", False)),
        )

    def get(self, key: tuple) -> Factored | None:
        return self._entries.get(key)

    def put(self, key: tuple, entry: Factored) -> None:
        self._entries = {key: entry}


def normalized_hessian(
    h: torch.Tensor, n_tokens: int, wf: torch.Tensor, *, consume: bool = False, device=None
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """``(H, damping base, dead channels)`` of the Hessian sum ``h = X^T X`` for the float32 weight
    ``wf [out, in]``, on wf's device; ``h`` is not modified, ``wf``'s dead columns are zeroed in place.

    H is GPTQ's normalization ``2 X^T X / N``: the solution does not depend on it, the loss and the
    saliencies do (it keeps them comparable with AutoGPTQ's and independent of the token count). Dead
    channels (a boolean mask on H's device) get ``H[i, i] = 1`` and ``W[:, i] = 0``; the base is the mean
    diag over live channels.
    ``consume``: ``h`` may be overwritten (it becomes H), when it is float32/float64 on wf's device.
    ``device``: where H is made (default wf's; the CPU for a float64 H on MPS, see :func:`factored_hessian`)."""
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    device = wf.device if device is None else torch.device(device)
    if consume and h.dtype == dtype and h.device == device:
        hw = h.detach().mul_(2.0 / n_tokens)  # the caller gave h up: scaled where it is, one n x n fewer
    else:
        hw = h.detach().to(dtype).to(device) * (2.0 / n_tokens)
    diag = hw.diagonal()
    dead = diag == 0
    n_dead = int(dead.sum())
    live_mean = float(diag[~dead].mean()) if n_dead < hw.shape[0] else 0.0
    if n_dead:
        hw[dead, dead] = 1.0
        wf[:, dead.to(wf.device)] = 0.0
    return hw, live_mean if live_mean > 0 else 1.0, dead


def factor_inverse_hessian(
    h: torch.Tensor, config, base: float, *, subject: str, dtypes=(torch.float32, torch.float64), first_step: int = 0
) -> Factorization:
    """The damping ladder (FAULTS row 18): ``config.damp_percent``, then each ``config.damp_ladder`` value
    (a GPTQConfig or a PruningConfig), in float32, then the same in float64; the first attempt whose
    Cholesky of H + damp I succeeds (and gives a finite U) wins. ``h`` is not modified. Past the ladder:
    ValueError starting with ``subject`` (the solver's tag and the module, e.g. "[gptq] Hessian of q").
    ``dtypes``/``first_step``: the rungs still to try and the attempts made before (for the MPS host rung)."""
    percents = (config.damp_percent,) + tuple(config.damp_ladder)
    steps = first_step
    n = h.shape[0]
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for dtype in dtypes:
        if dtype == torch.float64 and mps_semantics(h.device) and not in_host_step():
            # MPS has no float64: this rung runs on the CPU, and only U (float32) goes back to the device
            with on_host():
                fac = factor_inverse_hessian(h.cpu(), config, base, subject=subject, dtypes=(dtype,), first_step=steps)
            return fac._replace(u=fac.u.to(h.device))
        for pct in percents:
            damp = pct * base
            # U = chol_upper(H^-1) without forming H^-1: with J the index reversal, chol(J H J) = K gives
            # H = V V^T with V = J K J upper triangular, so H^-1 = (V^-1)^T V^-1 and, by uniqueness of the
            # factor, U = V^-1. One Cholesky and one triangular inverse instead of GPTQ's Cholesky, inverse
            # and second Cholesky (about 0.7 n^3 flops instead of 3.7 n^3; see upper_inverse).
            # Memory: both run in place on column-major n x n buffers (LAPACK's layout, so torch makes no
            # copy): J (H + damp I) J is built in ``a`` and factored there; the identity, stored transposed
            # (the same values, column-major), becomes U. Beside h that is two n^2 buffers at most, where
            # the out-of-place calls held five (14336^2 float32: 0.8 GB each, Llama-3-8B's down_proj).
            # ``+ 0.0`` everywhere then ``+ damp`` on the diagonal gives exactly ``h + damp * I`` (x + 0.0
            # turns -0.0 into +0.0, as adding the identity's zeros did).
            a = torch.empty_strided((n, n), (1, n), dtype=dtype, device=h.device)
            rows = max(1, (1 << 24) // n)  # J h J copied in slices: a whole flipped temporary is another n^2
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                a[n - r1 : n - r0].copy_(h[r0:r1].flip(0, 1))
            a.add_(0.0)
            a.diagonal().add_(damp)
            torch.linalg.cholesky_ex(a, out=(a, info))
            if int(info) == 0:
                v = a.flip(0, 1)  # V = J K J (column-major, as the factor)
                del a
                u = upper_inverse(v)
                del v
                if all_finite(u) and bool((u.diagonal() > 0).all()):
                    return Factorization(u.float(), float(damp), float(pct), steps, dtype == torch.float64)
            steps += 1
    raise ValueError(
        f"{subject} is not positive definite even with damp {percents[-1]} x mean diag "
        f"(= {percents[-1] * base:.4g}) in float64 after {steps} attempts; check the calibration "
        f"activations of this module, or raise damp_percent / damp_ladder"
    )


def factored_hessian(
    h: torch.Tensor,
    n_tokens: int,
    wf: torch.Tensor,
    config,
    *,
    subject: str,
    act_order: bool = False,
    consume: bool = False,
    shared: SharedFactorizations | None = None,
) -> Factored:
    """The Hessian side of a GPTQ/SparseGPT solve of the float32 weight ``wf``: H normalized, the dead
    channels (``wf``'s dead columns are zeroed in place), act-order's permutation (by descending diag H)
    and the damping ladder's factor of the (permuted) H. ``wf`` itself is not permuted. With ``shared``,
    a Hessian another weight already factored is not factored again. U and the permutation are on wf's
    device."""
    key = SharedFactorizations.key(h, n_tokens, config, wf.device) if shared is not None else None
    known = shared.get(key) if shared is not None else None
    if known is not None:  # another weight of this input factored h: only this weight's dead columns remain
        if bool(known.dead.any()):
            wf[:, known.dead.to(wf.device)] = 0.0
        return known
    # MPS has no float64: a float64 H (hessian_dtype="float64", MR-GPTQ's rotation) is made, permuted and
    # factored on the CPU, and only U (float32) goes to the device -- the CPU path's numbers exactly
    host = h.dtype == torch.float64 and mps_semantics(wf.device)
    with on_host() if host else contextlib.nullcontext():
        hw, base, dead = normalized_hessian(h, n_tokens, wf, consume=consume, device="cpu" if host else None)
        perm = None
        if act_order:
            perm = torch.sort(hw.diagonal(), descending=True, stable=True).indices
            hw = hw[perm][:, perm]
        fac = factor_inverse_hessian(hw, config, base, subject=subject)
    del hw
    if perm is not None:
        perm = perm.to(wf.device)
    fac = fac._replace(u=fac.u.to(wf.device))
    found = Factored(h, fac, base, dead, perm)
    if shared is not None:
        shared.put(key, found)
    return found


INVERSE_BLOCK = 1024


def upper_inverse(v: torch.Tensor, block: int = INVERSE_BLOCK) -> torch.Tensor:
    """``V^-1`` of an upper-triangular ``v [n, n]``, column-major, by triangular solves of column blocks.

    ``V^-1`` is upper triangular too, so the columns ``[c0, c1)`` need only the leading ``c1 x c1`` system:
    n^3 / 3 flops in all, where one solve against the whole identity costs n^3 (it also works through the
    zeros below the diagonal). The blocks end a multiple of ``block`` above the bottom, where a one-call
    solve's own blocking tends to fall, so the values mostly equal it bit for bit; where they do not
    (some sizes above ``block``, float64), they differ in the last bits, as another thread count would.
    Up to ``block`` columns it is the one call. About 2x faster at n = 5632 on a 2-core CPU."""
    n = v.shape[0]
    u = torch.eye(n, dtype=v.dtype, device=v.device).t()  # column-major, as LAPACK writes in place
    c1 = n
    while c1 > 0:
        c0 = max(0, c1 - block)
        cols = u[:c1, c0:c1]
        torch.linalg.solve_triangular(v[:c1, :c1], cols, upper=True, out=cols)
        c1 = c0
    return u


SweepFn = Callable[..., tuple]


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    n_tokens: int,
    config: GPTQConfig,
    *,
    name: str = "weight",
    layer: int | None = None,
    sweep: SweepFn | None = None,
    consume: bool = False,
    shared: SharedFactorizations | None = None,
    cross: torch.Tensor | None = None,
) -> QuantizedLayer:
    """Quantize ``w [out, in]`` with GPTQ given the Hessian sum ``h = X^T X`` over ``n_tokens`` tokens.

    ``w`` and ``h`` are not modified unless ``consume``: then the caller gives both up, and the solver
    works in their memory (``h`` becomes the scaled H; a float32 ``w`` becomes the working copy and then
    the dequantized weight, which the result's ``weight`` is). At Llama-3-8B's down_proj that is two
    buffers fewer (0.8 GB + 0.2 GB); the numbers are the same. ``sweep`` replaces the block sweep (the
    benchmark passes the pure-torch reference); by default :func:`calibra.ops.gptq_block_sweep` runs natively.
    ``shared``: weights that read the same ``h`` (q/k/v) pass one :class:`SharedFactorizations`, so ``h`` is
    factored once; the results are the same as without it.
    Returns codes/scales/zeros (and g_idx with act-order) in original column order, the dequantized
    weight in w's dtype, and the log row (loss, samples, damp used, ladder steps, seconds).
    ``clip_metric="output"``: see :func:`guarded_solve` (``consume`` is then ignored: the guard reads
    w and h after the solve).
    ``cross``: with ``config.gptaq``, the summed ``dX^T X~`` of the Linear's full-precision and quantized-model
    inputs (the runner's ``gptaq/cross`` statistic): the sweep then solves for GPTAQ's corrected target
    (:mod:`calibra.quant.gptaq`); with C = 0 that is exactly this solve without it.
    """
    config.validate()
    check_weight(w, config, name)
    check_hessian(h, n_tokens, w.shape[1], name)
    if cross is not None and not getattr(config, "gptaq", False):
        raise ValueError(f"[gptq] a cross statistic was given for {name} but the config has gptaq=False")
    if getattr(config, "gptaq", False) and cross is None:
        raise ValueError(
            f"[gptq] gptaq=True needs the cross statistic of {name} (dX^T X~, collected by the calibration runner "
            f"with gptaq=True); none was given"
        )
    kw = dict(name=name, layer=layer, out_dtype=w.dtype, sweep=sweep, method="gptq", shared=shared)
    clip_guard = output_clip(config)
    if cross is not None:
        return _gptaq_solve(w, h, n_tokens, config, cross, consume=consume and not clip_guard, **kw)
    if getattr(config, "choose_clip", False):  # no cross statistic (plain GPTQ, MoE experts): the clip choice
        from calibra.quant.gptaq import choose_clip_solve

        kw["shared"] = shared if shared is not None else SharedFactorizations()  # one factorization for both
        wf = w.detach().float().clone()
        return choose_clip_solve(wf, h, config, lambda t, c: _target_solve(t, h, n_tokens, c, consume=False, **kw))
    if clip_guard:
        return guarded_solve(w.detach().float(), h, n_tokens, config, **kw)
    in_place = consume and w.dtype == torch.float32 and w.is_contiguous()
    return _solve(w.detach() if in_place else w.detach().float().clone(), h, n_tokens, config, consume=consume, **kw)


def _gptaq_solve(w, h, n_tokens, config, cross, *, consume: bool, shared, **kw) -> QuantizedLayer:
    """GPTAQ: the factorization first (shared with the sweep, so nothing is factored twice), GPTQ's target
    corrected by it (:func:`calibra.quant.gptaq.correct_target`), then the ordinary solve of that target."""
    from calibra.quant.gptaq import correct_target

    t0 = time.perf_counter()
    choose = bool(getattr(config, "gptaq_choose", False))
    consume = consume and not choose  # the choice reads w and h after the solves
    shared = shared if shared is not None else SharedFactorizations()
    in_place = consume and w.dtype == torch.float32 and w.is_contiguous()
    wf = w.detach() if in_place else w.detach().float().clone()
    subject = f"[gptq] Hessian of {kw['name']}"
    fh = factored_hessian(
        h, n_tokens, wf, config, subject=subject, act_order=config.desc_act, consume=consume, shared=shared
    )
    w0 = wf.clone() if choose else None  # the full-precision weight (dead columns zeroed), for the choice
    correct_target(wf, cross, n_tokens, fh, float(config.gptaq_alpha))
    if choose:
        from calibra.quant.gptaq import choose_solve

        ql = choose_solve(
            w0,
            wf,
            h,
            n_tokens,
            config,
            cross,
            lambda t, c: _target_solve(t, h, n_tokens, c, consume=False, shared=shared, **kw),
        )
    else:
        ql = _target_solve(wf, h, n_tokens, config, consume=consume, shared=shared, **kw)
    ql.log.seconds = time.perf_counter() - t0
    return ql


def _target_solve(wf, h, n_tokens, config, *, consume: bool, shared, **kw) -> QuantizedLayer:
    """The GPTQ solve of the float32 target ``wf`` (with the output clip search's guard when configured)."""
    if output_clip(config):
        return guarded_solve(wf, h, n_tokens, config, shared=shared, **kw)
    return _solve(wf, h, n_tokens, config, consume=consume, shared=shared, **kw)


def output_clip(config) -> bool:
    """True when the config searches its clipping by the output error (clip_metric "output")."""
    return bool(config.mse_clip) and getattr(config, "clip_metric", "weight") == "output"


def guarded_solve(
    wf: torch.Tensor, h: torch.Tensor, n_tokens: int, config: GPTQConfig, *, shared=None, **kw
) -> QuantizedLayer:
    """GPTQ with the output-error clipping search, and the same solve without clipping (the factor is
    shared): the result with the lower measured output error ``tr((W - Q) H (W - Q)^T)`` is returned (the
    unclipped one on a tie), so the clip search never makes the layer worse on its calibration data.
    ``wf`` (float32) and ``h`` are not modified. ``log.seconds`` covers both solves."""
    t0 = time.perf_counter()
    shared = shared if shared is not None else SharedFactorizations()
    clipped = _solve(wf.clone(), h, n_tokens, config, shared=shared, **kw)
    plain_cfg = dataclasses.replace(config, mse_clip=False, clip_metric="weight")
    plain = _solve(wf.clone(), h, n_tokens, plain_cfg, shared=shared, **kw)
    e_clip = output_error(wf, clipped.weight, h)
    e_plain = output_error(wf, plain.weight, h)
    best = clipped if e_clip < e_plain else plain
    best.log.clip = "output" if best is clipped else "none"
    best.log.output_error = min(e_clip, e_plain)
    best.log.seconds = time.perf_counter() - t0
    return best


def _solve(
    wf: torch.Tensor,
    h: torch.Tensor,
    n_tokens: int,
    config: GPTQConfig,
    *,
    name: str,
    layer,
    out_dtype,
    sweep,
    method: str,
    rotation: dict | None = None,
    consume: bool = False,
    shared: SharedFactorizations | None = None,
) -> QuantizedLayer:
    t0 = time.perf_counter()
    out, n = wf.shape
    fmt, gs = config.format, config.group_size
    # the factor comes first (it zeroes wf's dead columns, which the scale fits below must see); the
    # sweep needs only U, not H, so no n x n buffer but U outlives this call
    fh = factored_hessian(
        h,
        n_tokens,
        wf,
        config,
        subject=f"[gptq] Hessian of {name}",
        act_order=config.desc_act,
        consume=consume,
        shared=shared,
    )
    fac, perm, n_dead = fh.fac, fh.perm, int(fh.dead.sum())

    gscale = nvfp4_global_scale(wf) if fmt == "nvfp4" else 1.0
    shrink = torch.tensor(config.shrink(), dtype=torch.float32, device=wf.device)
    sdt = out_dtype
    kw = dict(fmt=fmt, bits=config.bits, sym=config.sym, scale_dtype=sdt, global_scale=gscale, shrink=shrink)
    by_output = output_clip(config)
    # Parameter tables fitted before the sweep: one per row (group_size -1, AutoGPTQ fits it on the whole
    # W) or static groups (fitted on the unpermuted W).
    static = gs == -1 or config.static_groups
    table_s = table_z = None
    if static:
        if by_output:  # each column's error weighted by its activation energy diag(H)
            table_s, table_z = fit_groups_weighted(wf, gs, column_energy(h, wf.device), **kw)
        else:
            table_s, table_z = fit_groups(wf, gs, **kw)

    if perm is not None:
        wf = wf[:, perm]
    u = fac.u
    # the group (table entry) of each column in sweep order
    cols = torch.arange(n, device=wf.device)
    orig = perm if perm is not None else cols
    if gs == -1:
        col_group = torch.zeros(n, dtype=torch.int32, device=wf.device)
    else:
        col_group = ((orig if static else cols) // gs).to(torch.int32)

    bs = config.block_size if gs == -1 else max(config.block_size // gs, 1) * gs
    fit_here = by_output and not static
    if fit_here:
        # the output-error search fits each group in torch from the group's current (updated) columns, so
        # a block is one group: everything before it is final when it is fitted (the lazy batch is exact)
        bs = gs
        col_w = u.diagonal().float().pow(-2)  # GPTQ's weight of column j's error: 1 / U[j, j]^2
    sweep = sweep or _native_sweep
    # consume: a finished block's columns of wf are never read again, so its dequantized values go there
    q = wf if consume else torch.empty_like(wf)
    codes = torch.empty((out, n), dtype=torch.uint8, device=wf.device)
    dyn_s, dyn_z = [], []
    with on_host():  # a float64 accumulator on the CPU (MPS has no float64)
        loss = torch.zeros((), dtype=torch.float64)
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        c = i2 - i1
        fit = torch.zeros(c, dtype=torch.int32, device=wf.device)
        if static:
            s_in, z_in, grp = table_s, table_z, col_group[i1:i2]
        elif fit_here:
            s_in, z_in = fit_groups_weighted(wf[:, i1:i2], gs, col_w[i1:i2], **kw)
            grp = torch.zeros(c, dtype=torch.int32, device=wf.device)
        else:
            fit[::gs] = gs
            if c % gs:  # a ragged last group (gs does not divide in): fitted on the columns it has
                fit[c - c % gs] = c % gs
            s_in = torch.zeros((out, -(-c // gs)), dtype=torch.float32, device=wf.device)
            z_in = torch.zeros_like(s_in)
            grp = col_group[i1:i2] - i1 // gs
        res = sweep(
            wf[:, i1:i2].contiguous(),
            u[i1:i2, i1:i2].contiguous(),
            s_in,
            z_in,
            grp.contiguous(),
            fit,
            torch.empty(0, dtype=torch.uint8, device=wf.device),
            shrink,
            config.bits,
            config.sym,
            fmt,
            sdt,
            float(gscale),
        )
        bq, bcodes, berr, bs_out, bz_out = res
        q[:, i1:i2] = bq
        codes[:, i1:i2] = bcodes
        if mps_semantics(wf.device):  # MPS has no float64: the loss is summed on the CPU
            with on_host():
                loss += (berr.cpu().double() ** 2).sum() / 2
        else:
            loss += (berr.double() ** 2).sum() / 2
        if static:
            table_s, table_z = bs_out, bz_out
        else:
            dyn_s.append(bs_out)
            dyn_z.append(bz_out)
        if i2 < n:
            wf[:, i2:].addmm_(berr, u[i1:i2, i2:], alpha=-1.0)
    if not static:
        table_s, table_z = torch.cat(dyn_s, 1), torch.cat(dyn_z, 1)

    g_idx = None
    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = cols
        q, codes = q[:, inv], codes[:, inv]
        if config.uses_g_idx:
            g_idx = (inv // gs).to(torch.int32)  # column perm[j] sits at sweep position j, group j // gs
    weight = q.to(out_dtype)
    scales = stored_scales(table_s, fmt, out_dtype)
    zeros = table_z.to(torch.uint8) if fmt == "int" else None
    gst = torch.tensor([gscale], dtype=torch.float32, device=wf.device) if fmt != "int" else None
    log = ModuleLog(
        module=name,
        layer=layer,
        method=method,
        loss=float(loss),
        samples=n_tokens,
        damp=fac.damp,
        damp_percent=fac.damp_percent,
        ladder_steps=fac.steps,
        float64=fac.float64,
        dead_channels=n_dead,
        block_size=bs,
        seconds=time.perf_counter() - t0,
        clip=("output" if by_output else "weight") if config.mse_clip else "none",
    )
    return QuantizedLayer(
        name=name,
        method=method,
        format=fmt,
        bits=config.bits,
        group_size=gs,
        symmetric=config.sym,
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        global_scale=gst,
        weight=weight,
        rotation=rotation,
        log=log,
    )


def _native_sweep(*args):
    return torch.ops.calibra.gptq_block_sweep(*args)


def reference_sweep(*args):
    """The pure-torch reference sweep (the oracle; the benchmark's baseline)."""
    from calibra.ops._ref.gptq import gptq_block_sweep as ref

    return ref(*args)


__all__ = [
    "gptq_quantize",
    "guarded_solve",
    "output_clip",
    "normalized_hessian",
    "factor_inverse_hessian",
    "Factorization",
    "Factored",
    "SharedFactorizations",
    "factored_hessian",
    "upper_inverse",
    "reference_sweep",
    "gptq_block_sweep",
]
