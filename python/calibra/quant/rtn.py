"""RTN: round-to-nearest of one weight, optionally with MSE-searched clipping per group."""

from __future__ import annotations

import time

import torch

from calibra.ops import dequantize, quantize
from calibra.quant._tables import fit_groups, nvfp4_global_scale, quantize_groups, stored_scales
from calibra.quant.config import RTNConfig
from calibra.quant.result import ModuleLog, QuantizedLayer
from calibra.quant.validate import check_weight


def rtn_quantize(
    w: torch.Tensor, config: RTNConfig, *, name: str = "weight", layer: int | None = None
) -> QuantizedLayer:
    """Quantize ``w [out, in]`` (float32/float16/bfloat16; not modified) with round-to-nearest.

    Without ``mse_clip`` this is exactly :func:`calibra.ops.quantize` (native kernels). With it, each
    group's range is scaled by the candidate shrink factors and the one with the least squared error
    is kept (the unshrunk range is a candidate, so the error never grows).
    """
    config.validate()
    t0 = time.perf_counter()
    check_weight(w, config, name)
    fmt = config.format
    if fmt == "fp8":  # per-channel E4M3 (calibra.quant.fp8: compressed-tensors' exact rounding)
        from calibra.quant.fp8 import fp8_dequantize, fp8_quantize_weight

        codes, scales = fp8_quantize_weight(w)
        weight = fp8_dequantize(codes, scales).to(w.dtype)
        zeros = gscale = None
    elif not config.mse_clip:
        qt = quantize(w, bits=config.bits, group_size=config.group_size, symmetric=config.sym, format=fmt)
        weight = dequantize(qt)
        codes, scales, zeros, gscale = qt.codes, qt.scales, qt.zeros, qt.global_scale
    else:
        wf = w.float()
        gscale_f = nvfp4_global_scale(wf) if fmt == "nvfp4" else 1.0
        shrink = torch.tensor(config.shrink(), dtype=torch.float32)
        s, z = fit_groups(
            wf,
            config.group_size,
            fmt=fmt,
            bits=config.bits,
            sym=config.sym,
            scale_dtype=w.dtype,
            global_scale=gscale_f,
            shrink=shrink,
        )
        codes, vals = quantize_groups(wf, s, z, config.group_size, fmt=fmt, bits=config.bits, global_scale=gscale_f)
        weight = vals.to(w.dtype)
        scales = stored_scales(s, fmt, w.dtype)
        zeros = z.to(torch.uint8) if fmt == "int" else None
        gscale = torch.tensor([gscale_f], dtype=torch.float32, device=w.device) if fmt != "int" else None
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
