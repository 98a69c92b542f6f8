"""Named recipes over the weight-only configs: ``preset="best"`` (``--preset best``) turns on the
combination measured best for int GPTQ (docs/quantize.md, "GPTAQ's quality": the table it was chosen from),
keeping the bits, group size, symmetry and every AutoGPTQ option the caller gave.

``best`` = act-order GPTAQ with a per-Linear choice (``GPTQConfig(gptaq=True, gptaq_choose=True,
choose_clip=True, desc_act=True, static_groups=True)``): each Linear is solved four ways -- GPTQ and
GPTAQ, each with and without the weight-MSE clip search, one factorization -- and keeps the solve with the
least measured error against the full-precision model's output on the calibration tokens; the choice is
recorded per module (``report.json`` modules' ``choice``, ``quantization.json`` modules' ``choice``). Four
sweeps per Linear plus one full-precision forward per layer (the measured time multiple of plain GPTQ is in
docs/quantize.md). Act-order uses static groups, so the export is what plain GPTQ's is (a trivial g_idx)."""

from __future__ import annotations

import dataclasses

PRESETS = ("best",)


def apply_preset(preset: str, config=None):
    """The config ``preset`` makes of ``config`` (default ``GPTQConfig()``); refused for what it was not
    measured on."""
    from calibra.quant.config import GPTQConfig, MRGPTQConfig, RTNConfig

    if preset not in PRESETS:
        raise ValueError(f"[quantize] unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if config is None:
        config = GPTQConfig()
    if isinstance(config, (RTNConfig, MRGPTQConfig)) or not isinstance(config, GPTQConfig):
        raise ValueError(
            f"[quantize] preset {preset!r} is measured for int GPTQ only (a GPTQConfig / --method gptq), "
            f"not {type(config).__name__}"
        )
    if config.format != "int":
        raise ValueError(
            f"[quantize] preset {preset!r} is measured for int formats only, not {config.format}; use "
            f"--method mr-gptq (its per-Linear choice) for FP4"
        )
    if config.awq:
        raise ValueError(f"[quantize] preset {preset!r} does not take awq (GPTAQ and AWQ are not combined yet)")
    output_clip = config.mse_clip and config.clip_metric == "output"
    return dataclasses.replace(
        config,
        gptaq=True,
        gptaq_choose=True,
        # the weight-MSE clip toggled inside the choice (an output-MSE clip the caller asked for stays as it is)
        choose_clip=not output_clip,
        # act-order with static groups: the columns by descending Hessian diagonal, the groups on the original
        # columns (a trivial g_idx), so every export that writes plain GPTQ writes this too
        desc_act=True,
        static_groups=True,
    )


__all__ = ["PRESETS", "apply_preset"]
