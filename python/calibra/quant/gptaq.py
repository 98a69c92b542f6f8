"""GPTAQ (Li et al., 2025, "GPTQv2: efficient finetuning-free quantization with asymmetric calibration"):
GPTQ whose target is the full-precision model's output of the Linear, not the output of the unquantized
weight on the quantized model's inputs.

GPTQ minimizes ``||(Q - W) X~||^2`` over the inputs ``X~`` the partly quantized model feeds the Linear
(true-sequential). The full-precision model feeds ``X = X~ + dX``; GPTAQ minimizes ``||Q X~ - W X||^2``
instead, which adds ``W dX`` -- the error the earlier layers accumulated -- to what the solve compensates.
With H = 2/N X~^T X~ (rows are tokens) and the cross statistic C = 2/N dX^T X~ (``[in, in]``,
``dX^T X~`` summed over tokens by :class:`calibra.calib.observers.CrossObserver`), the paper's closed form
for the sequential solve adds, to each later column, the column being quantized times a row of

    P = alpha * triu_1(C U^T) U,       U = the upper Cholesky factor of the damped H^-1 (GPTQ's factor)

(``triu_1``: strictly upper triangular part; alpha the paper's 0.25).

**What calibra changes.** The paper multiplies P's row by the column's *current* value (updated by the
earlier columns' errors); calibra multiplies it by the full-precision weight ``W``, which is the weight
``dX`` multiplies in the objective. The correction is then one product, ``W P``, known before the sweep:
GPTAQ is GPTQ on the target ``W + W P``, the native block sweep (and every GPTQ option -- act-order, static
groups, the clip searches, FP4 grids) is shared unchanged, and with identical inputs (C = 0) the target is
W and the result is GPTQ's bit for bit. The difference from the paper's update is second order (the
earlier columns' error times P).
"""

from __future__ import annotations

import torch


def correct_target(wf: torch.Tensor, cross: torch.Tensor, n_tokens: int, fh, alpha: float) -> torch.Tensor:
    """``wf + alpha * wf P`` (in place on the float32 ``wf [out, in]``, whose dead columns the factorization
    ``fh`` (:class:`calibra.quant.gptq.Factored`) already zeroed); ``cross`` is the summed ``dX^T X~`` over
    ``n_tokens`` tokens. Returns ``wf``."""
    n = wf.shape[1]
    if tuple(cross.shape) != (n, n):
        raise ValueError(
            f"[gptaq] cross statistic must be [{n}, {n}] for a weight with {n} inputs, got {list(cross.shape)}"
        )
    u = fh.fac.u  # float32, on wf's device; for the permuted H under act-order
    c = cross.detach().to(device=wf.device, dtype=torch.float32) * (2.0 / n_tokens)  # the scale of H
    if bool(fh.dead.any()):
        c[:, fh.dead.to(wf.device)] = 0.0  # a dead quantized-model input carries nothing to correct with
    perm = fh.perm
    if perm is not None:
        c = c[perm][:, perm]
    p = (c @ u.t()).triu_(1) @ u
    del c
    w_sweep = wf if perm is None else wf[:, perm]
    corr = w_sweep @ p
    if perm is None:
        wf.add_(corr, alpha=alpha)
    else:
        wf[:, perm] += alpha * corr
    return wf


def asymmetric_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor, cross: torch.Tensor) -> float:
    """GPTAQ's objective ``||Q X~ - W X||^2`` on the calibration tokens up to a constant that does not
    depend on Q, relative to ``tr(W H W^T)``: with D = Q - W, ``tr(D H D^T) - 2 tr(W C D^T)`` (``h``, ``cross``:
    the summed ``X~^T X~`` and ``dX^T X~``). Lower is better; only differences between two Q mean anything."""
    wd = w.detach().double()
    d = q.detach().double().to(wd.device) - wd
    h64, c64 = h.detach().double().to(wd.device), cross.detach().double().to(wd.device)
    num = float(((d @ h64) * d).sum()) - 2.0 * float(((wd @ c64) * d).sum())
    den = float(((wd @ h64) * wd).sum())
    return num / den if den > 0 else num


def choice_candidates(config) -> list[tuple[str, str, object]]:
    """``(name, target, config)`` of each solve the per-Linear choice (``gptaq_choose``) compares, in tie
    order (the first of equal errors is kept): plain GPTQ first, so a Linear whose two input streams agree
    keeps GPTQ's bits; with ``choose_clip`` also each target with the weight-MSE clip toggled."""
    import dataclasses

    out = [("gptq", "plain", config), ("gptaq", "corrected", config)]
    if getattr(config, "choose_clip", False):
        other = dataclasses.replace(config, mse_clip=not config.mse_clip, clip_metric="weight")
        tag = "+mse" if other.mse_clip else "+noclip"
        out += [("gptq" + tag, "plain", other), ("gptaq" + tag, "corrected", other)]
    return out


def choose_solve(w0: torch.Tensor, corrected: torch.Tensor, h, n_tokens: int, config, cross, solve):
    """Solve every :func:`choice_candidates` entry (``solve(target, config)`` -> QuantizedLayer; the targets:
    ``w0`` the full-precision weight, ``corrected`` GPTAQ's) and keep the one with the least
    :func:`asymmetric_error` -- the measured error against the full-precision model's output on the
    calibration tokens. ``log.choice`` = ``{"kept": name, "errors": {name: error}}``."""
    best, errors = None, {}
    for name, target, cfg in choice_candidates(config):
        ql = solve((w0 if target == "plain" else corrected).clone(), cfg)
        errors[name] = asymmetric_error(w0, ql.weight, h, cross)
        if best is None or errors[name] < errors[best[0]]:
            best = (name, ql)
    ql = best[1]
    ql.log.choice = {"kept": best[0], "errors": errors}
    return ql


def choose_clip_solve(wf: torch.Tensor, h, config, solve):
    """The choice where GPTAQ does not apply (a Linear with no cross statistic: MoE experts, whose two streams
    route their own tokens): GPTQ with and without the weight-MSE clip (``solve(target, config)``), the one with
    the lower measured output error ``tr((W - Q) H (W - Q)^T)`` kept (the config's own on a tie)."""
    import time

    from calibra.quant.clip_search import output_error

    t0 = time.perf_counter()
    best, errors = None, {}
    for name, _target, cfg in choice_candidates(config):
        if _target != "plain":
            continue
        ql = solve(wf.clone(), cfg)
        errors[name] = output_error(wf, ql.weight, h)
        if best is None or errors[name] < errors[best[0]]:
            best = (name, ql)
    ql = best[1]
    ql.log.choice = {"kept": best[0], "errors": errors}
    ql.log.seconds = time.perf_counter() - t0
    return ql


__all__ = ["correct_target", "asymmetric_error", "choice_candidates", "choose_solve", "choose_clip_solve"]
