"""RTN: round-to-nearest of one weight, optionally with clipping searched per group (by the weight's
squared error, or by the output error on calibration Hessians: :mod:`calibra.quant.clip_search`)."""

from __future__ import annotations

import time

import torch

from calibra.ops import dequantize, quantize
from calibra.quant._tables import fit_groups, nvfp4_global_scale, quantize_groups, stored_scales
from calibra.quant.clip_search import column_energy, fit_groups_weighted, output_error
from calibra.quant.config import RTNConfig
from calibra.quant.result import ModuleLog, QuantizedLayer
from calibra.quant.validate import check_hessian, check_weight


def rtn_quantize(
    w: torch.Tensor,
    config: RTNConfig,
    *,
    name: str = "weight",
    layer: int | None = None,
    h: torch.Tensor | None = None,
    n_tokens: int | None = None,
) -> QuantizedLayer:
    """Quantize ``w [out, in]`` (float32/float16/bfloat16; not modified) with round-to-nearest.

    Without ``mse_clip`` this is exactly :func:`calibra.ops.quantize` (native kernels). With it, each
    group's range is scaled by the candidate shrink factors and the one with the least squared error
    is kept (the unshrunk range is a candidate, so the error never grows).

    With ``clip_metric="output"`` (``h = X^T X`` over ``n_tokens`` tokens required) the error is
    weighted by diag(H) per input column, and the unclipped result is kept when its measured output
    error ``tr((W - Q) H (W - Q)^T)`` is not higher; ``log.clip`` says which was kept, ``log.output_error``
    the relative output error.
    """
    config.validate()
    t0 = time.perf_counter()
    check_weight(w, config, name)
    if config.clip_on_output:
        if h is None:
            raise ValueError(
                f"[quantize] RTN with clip_metric 'output' needs the calibration Hessian of {name}; "
                f"calibrate with the 'hessian' observer, or use clip_metric 'weight'"
            )
        check_hessian(h, n_tokens, w.shape[1], name)
    fmt = config.format
    clip, out_err = ("weight" if config.mse_clip else "none"), None
    if fmt == "fp8":  # per-channel E4M3 (calibra.quant.fp8: compressed-tensors' exact rounding)
        from calibra.quant.fp8 import fp8_dequantize, fp8_quantize_weight

        codes, scales = fp8_quantize_weight(w)
        weight = fp8_dequantize(codes, scales).to(w.dtype)
        zeros = gscale = None
        clip = "none"
    elif not config.mse_clip:
        codes, scales, zeros, gscale, weight = _plain(w, config)
    else:
        wf = w.float()
        gscale_f = nvfp4_global_scale(wf) if fmt == "nvfp4" else 1.0
        shrink = torch.tensor(config.shrink(), dtype=torch.float32)
        kw = dict(fmt=fmt, bits=config.bits, sym=config.sym, scale_dtype=w.dtype, global_scale=gscale_f, shrink=shrink)
        if config.clip_on_output:
            s, z = fit_groups_weighted(wf, config.group_size, column_energy(h, w.device), **kw)
        else:
            s, z = fit_groups(wf, config.group_size, **kw)
        codes, vals = quantize_groups(wf, s, z, config.group_size, fmt=fmt, bits=config.bits, global_scale=gscale_f)
        weight = vals.to(w.dtype)
        scales = stored_scales(s, fmt, w.dtype)
        zeros = z.to(torch.uint8) if fmt == "int" else None
        gscale = torch.tensor([gscale_f], dtype=torch.float32, device=w.device) if fmt != "int" else None
        if config.clip_on_output:
            clip, out_err = "output", output_error(w, weight, h)
            plain = _plain(w, config)
            plain_err = output_error(w, plain[4], h)
            if plain_err <= out_err:  # the guard: a clip that does not lower the output error is dropped
                codes, scales, zeros, gscale, weight = plain
                clip, out_err = "none", plain_err
    loss = float(((weight.float() - w.float()) ** 2).sum()) / 2
    log = ModuleLog(
        module=name,
        layer=layer,
        method="rtn",
        loss=loss,
        samples=0,
        damp=0.0,
        damp_percent=0.0,
        ladder_steps=0,
        float64=False,
        dead_channels=0,
        block_size=0,
        seconds=time.perf_counter() - t0,
        clip=clip,
        output_error=out_err,
    )
    return QuantizedLayer(
        name=name,
        method="rtn",
        format=fmt,
        bits=config.bits,
        group_size=config.group_size,
        symmetric=config.sym,
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=None,
        global_scale=gscale,
        weight=weight,
        rotation=None,
        log=log,
    )


def _plain(w: torch.Tensor, config: RTNConfig):
    """(codes, scales, zeros, global scale, dequantized weight) of plain RTN (native kernels, no clip)."""
    qt = quantize(w, bits=config.bits, group_size=config.group_size, symmetric=config.sym, format=config.format)
    return qt.codes, qt.scales, qt.zeros, qt.global_scale, dequantize(qt)
