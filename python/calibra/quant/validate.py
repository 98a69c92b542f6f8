"""Input checks shared by the solvers; every message names the module."""

from __future__ import annotations

import contextlib

import torch

from calibra.finite import all_finite, first_nonfinite
from calibra.mps import on_host

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


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
    bad = first_nonfinite(w)
    if bad is not None:
        r, c = bad
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
