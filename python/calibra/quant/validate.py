"""Input checks shared by the solvers; every message names the module."""

from __future__ import annotations

import contextlib

import torch

from calibra.mps import on_host

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_SLICE = 1 << 24  # elements per slice of the checks below (64 MB of float32)


def all_finite(t: torch.Tensor) -> bool:
    """``torch.isfinite(t).all()`` over slices of rows: the one-shot form allocates temporaries as large as
    ``t`` (1.3 GiB for a 14336 x 14336 float32 Hessian, at the moment memory is tightest)."""
    rows = max(1, _SLICE // max(1, t.shape[-1])) if t.dim() else 1
    if t.dim() == 0 or t.shape[0] <= rows:
        return bool(torch.isfinite(t).all())
    return all(bool(torch.isfinite(t[i : i + rows]).all()) for i in range(0, t.shape[0], rows))


def check_weight(w, config, name: str) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(
            f"[quantize] the weight of {name} must be a 2-D tensor [out, in], got "
            f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}"
        )
    if w.dtype not in _FLOATS:
        raise TypeError(f"[quantize] the weight of {name} must be float32, float16 or bfloat16, got {w.dtype}")
    problem = config.layer_problem(name, w.shape[1])
    if problem:
        raise ValueError(f"[quantize] {problem}")
    bad = ~torch.isfinite(w)
    if bool(bad.any()):
        r, c = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"[quantize] the weight of {name} contains NaN/Inf (first at row {r}, col {c})")


def check_hessian(h, n_tokens, in_features: int, name: str) -> None:
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != (in_features, in_features):
        got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"[gptq] the Hessian of {name} must be [in, in] = {(in_features, in_features)}, got {got}")
    if h.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"[gptq] the Hessian of {name} must be float32 or float64 (never a low-precision Hessian), got {h.dtype}"
        )
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
        raise ValueError(
            f"[gptq] {name} needs a Hessian from at least one token, got n_tokens={n_tokens!r}; "
            f"check that calibration data reached this module"
        )
    with on_host() if h.dtype == torch.float64 else contextlib.nullcontext():  # MPS keeps float64 on the CPU
        finite = all_finite(h)
    if not finite:
        raise ValueError(f"[gptq] the Hessian of {name} contains NaN/Inf; check the calibration activations")
