"""Mixed precision: keep the most sensitive modules at higher precision within a bits-per-weight budget.

Sensitivity of a module (from the calibration statistics, before anything is quantized): the output
error of round-to-nearest at the base format on the calibration activations,
``err = tr(dW H dW^T) / n = E_x ||dW x||^2`` with ``dW = RTN(W) - W`` and ``H / n`` the module's mean
Hessian (for experts the shrunk one). This is the quantity GPTQ minimizes, measured before GPTQ, so
every module is scored on the same footing. Modules are promoted in order of error per weight
(the error removed per extra bit spent, since promoted modules have ~0 error) while the average bits
per weight over all targeted weights stays within the budget.

Bits per weight count the codes and the scale metadata: ``bits + 16/g`` for symmetric int groups
(``+ bits/g`` for the zero point when asymmetric), ``4 + 8/32`` for MXFP4, ``4 + 8/16`` (+ a
negligible global scale) for NVFP4, 16 for a module left dense. The promoted precision is 8-bit int
with the same group size for int formats, and dense (the original weight) for FP4 formats.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from calibra.mps import mps_semantics, on_host
from calibra.quant.config import MRGPTQConfig, RTNConfig


def bits_per_weight(config) -> float:
    if config is None:
        return 16.0
    fmt = getattr(config, "format", "int")
    if fmt == "mxfp4":
        return 4.0 + 8.0 / 32
    if fmt == "nvfp4":
        return 4.0 + 8.0 / 16
    if fmt == "fp8":
        return 8.0  # one scale per row: negligible per weight
    g = config.group_size
    if g == -1:
        return float(config.bits)  # one scale per row: negligible per weight
    return config.bits + (16.0 + (0 if config.sym else config.bits)) / g


def promoted(config):
    """The higher-precision config a sensitive module gets (``None`` = dense)."""
    if isinstance(config, MRGPTQConfig) or getattr(config, "format", "int") != "int" or config.bits >= 8:
        return None
    return dataclasses.replace(config, bits=8)


def base_rtn(config) -> RTNConfig:
    """The RTN config whose error scores sensitivity."""
    if isinstance(config, MRGPTQConfig):
        from calibra.quant.config import FP4_GROUP

        return RTNConfig(bits=4, group_size=FP4_GROUP[config.format], sym=True, format=config.format)
    return RTNConfig(bits=config.bits, group_size=config.group_size, sym=config.sym, format=config.format)


def sensitivities(targets, stats) -> dict[str, float]:
    """``name -> E_x ||dW x||^2`` for every target (see the module docstring)."""
    from calibra.quant.apply import hessian_for
    from calibra.quant.rtn import rtn_quantize

    out = {}
    for t, cfg in targets:
        w = t.weight()
        wq = rtn_quantize(w, cfg).weight
        h, n, _ = hessian_for(stats, t)
        host = mps_semantics(w.device)  # MPS has no float64: the sensitivity is taken on the CPU
        with on_host() if host else contextlib.nullcontext():
            if host:
                wq, w, h = wq.cpu(), w.cpu(), h.cpu()
            dw = wq.double() - w.double()
            out[t.name] = float(torch.einsum("oi,ij,oj->", dw, h.double().to(dw.device), dw)) / max(n, 1)
    return out


def plan(targets, sens: dict[str, float], config, budget_bits: float) -> dict:
    """``{"overrides": {name: config or None}, "promoted": [...], "avg_bits": x, ...}``.

    ``targets``: list of ``Target`` (numel, name). Raises when the budget is below the base format."""
    base_b = bits_per_weight(config)
    hi_cfg = promoted(config)
    hi_b = bits_per_weight(hi_cfg)
    total = sum(t.numel for t in targets)
    if budget_bits < base_b - 1e-9:
        raise ValueError(
            f"[quantize] mixed-precision budget {budget_bits} bits/weight is below the base format's "
            f"{base_b:.4g}; raise budget_bits or lower the base bits"
        )
    used = base_b * total
    order = sorted(targets, key=lambda t: (-sens[t.name] / t.numel, t.name))
    chosen = []
    for t in order:
        extra = (hi_b - base_b) * t.numel
        if (used + extra) / total > budget_bits + 1e-9:
            continue
        used += extra
        chosen.append(t.name)
    return {
        "budget_bits": budget_bits,
        "base_bits_per_weight": base_b,
        "promoted_to": "dense" if hi_cfg is None else f"int{hi_cfg.bits} g{hi_cfg.group_size}",
        "promoted_bits_per_weight": hi_b,
        "avg_bits_per_weight": used / total,
        "promoted": chosen,
        "sensitivity": {k: sens[k] for k in sorted(sens)},
        "overrides": {name: hi_cfg for name in chosen},
    }


__all__ = ["bits_per_weight", "promoted", "base_rtn", "sensitivities", "plan"]
