"""Activation-quantized schemes: complete recipes selected by one name (``--scheme NAME``).

=================  =====================================================================================
``fp8-dynamic``    FP8 E4M3 weights, one scale per output channel (RTN, absmax / 448); every quantized
                   Linear's input quantized to FP8 per token at run time (data-free). compressed-tensors'
                   ``FP8_DYNAMIC`` preset.
``fp8``            the same weights; every quantized Linear's input quantized to FP8 with one *static*
                   per-tensor scale calibrated on the calibration text (absmax / 448 of what the module
                   saw). compressed-tensors' ``FP8`` preset with per-channel weights.
``w8a8``           INT8 W8A8 (alias ``int8``): symmetric int8 weights, one scale per output channel,
                   solved by GPTQ (act-order, true-sequential); every quantized Linear's input quantized
                   to int8 per token at run time; SmoothQuant migration with its strength searched per
                   layer on the calibration data (``calibra.quant.smoothquant``). compressed-tensors'
                   ``W8A8`` preset.
``w8a8-static``    the same weights and smoothing; every input quantized to int8 with one *static*
                   per-tensor scale calibrated on the smoothed inputs (absmax / 127.5, or a percentile).
``nvfp4``          NVFP4 W4A4: NVFP4 weights (E2M1, group 16, E4M3 group scales under a per-tensor global
                   scale; RTN, or GPTQ when a GPTQConfig is given); every input quantized to NVFP4 with
                   per-16 E4M3 scales computed at run time under one *static* global scale per Linear,
                   calibrated (448 * 6 / absmax of the calibration inputs). compressed-tensors' ``NVFP4``.
``mxfp4``          MXFP4 W4A4: MXFP4 weights (E2M1, group 32, E8M0 scales; RTN or GPTQ); every input
                   quantized to MXFP4 with per-32 E8M0 scales computed at run time (data-free with RTN).
                   compressed-tensors' ``MXFP4``.
=================  =====================================================================================

``kv_cache="fp8"`` (``--kv-cache fp8``) is separate and combines with any weight scheme: calibrated
per-layer ``k_scale`` / ``v_scale`` (absmax / 448 of the keys and values as written to the cache, after
RoPE), and K/V quantize-dequantized with them in the simulation (``calibra.quant.kv_fp8``).

Every field is validated before a weight loads; the math lives in ``calibra.quant.fp8``,
``calibra.quant.int8`` and ``calibra.quant.fp4_act``.
"""

from __future__ import annotations

from dataclasses import dataclass

from calibra.quant.config import FP4_GROUP, GPTQConfig, RTNConfig

SCHEMES = ("fp8", "fp8-dynamic", "w8a8", "w8a8-static", "nvfp4", "mxfp4")
ALIASES = {"int8": "w8a8"}
STATIC_SCHEMES = ("fp8", "w8a8-static")  # one static scale per input, chosen by an observer
FP4_SCHEMES = ("nvfp4", "mxfp4")  # W4A4: the weights' solver may be chosen (RTN or GPTQ)
OBSERVERS = ("absmax", "percentile", "mse")
KV_CACHE_FORMATS = ("fp8",)


@dataclass(frozen=True)
class ActQuantConfig:
    """How every quantized Linear's input is quantized.

    - ``format``: "fp8" (E4M3) or "int8" (symmetric, ``calibra.quant.int8``).
    - ``dynamic``: True = one scale per token computed at run time; False = one static per-tensor scale
      from calibration (``observer``).
    - ``observer``: how a static scale is chosen from the calibration statistics: "absmax" (the largest
      magnitude the module's input reached) or "percentile" (the ``clip_percentile``-th percentile of the
      input's magnitudes, from the range observer's histogram, to 1/16 octave, rounded outward: values
      beyond it saturate at +-448 x scale) or "mse" (per input, the shrink factor of the absmax whose
      quantize-dequantize has the least measured squared error on the calibration inputs:
      ``calibra.quant.act_mse``).
    """

    format: str = "fp8"
    dynamic: bool = True
    observer: str = "absmax"
    clip_percentile: float = 99.99

    def validate(self) -> ActQuantConfig:
        if self.format not in ("fp8", "int8", "nvfp4", "mxfp4"):
            raise ValueError(
                f"[quantize] ActQuantConfig.format must be 'fp8', 'int8', 'nvfp4' or 'mxfp4', got {self.format!r}"
            )
        if self.format == "nvfp4" and self.dynamic or self.format == "mxfp4" and not self.dynamic:
            raise ValueError(
                "[quantize] ActQuantConfig: nvfp4 inputs have a static global scale (dynamic=False), mxfp4 inputs "
                "are dynamic only (dynamic=True)"
            )
        if not isinstance(self.dynamic, bool):
            raise ValueError(f"[quantize] ActQuantConfig.dynamic must be a bool, got {self.dynamic!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(
                f"[quantize] ActQuantConfig.observer must be one of {', '.join(OBSERVERS)}, got {self.observer!r}"
            )
        if self.dynamic and self.observer != "absmax":
            raise ValueError(
                f"[quantize] observer {self.observer!r} chooses static scales; a dynamic scheme computes one per "
                f"token at run time (use --scheme {' or '.join(STATIC_SCHEMES)})"
            )
        p = self.clip_percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50.0 < p <= 100.0:
            raise ValueError(f"[quantize] ActQuantConfig.clip_percentile must be in (50, 100], got {p!r}")
        return self

    @property
    def needs_data(self) -> bool:
        return not self.dynamic

    def to_dict(self) -> dict:
        d = {"format": self.format, "dynamic": self.dynamic, "observer": None if self.dynamic else self.observer}
        if self.observer == "percentile":
            d["clip_percentile"] = self.clip_percentile
        if self.observer == "mse" and not self.dynamic:
            from calibra.quant.act_mse import SHRINK_GRID

            d["shrink_grid"] = list(SHRINK_GRID)
        return d


def resolve_scheme(name: str | None) -> str | None:
    """The canonical name of a scheme (``int8`` -> ``w8a8``); unknown names are left for
    :func:`scheme_configs` to refuse."""
    return ALIASES.get(name, name) if isinstance(name, str) else name


def scheme_configs(
    name: str, *, observer: str = "absmax", clip_percentile: float = 99.99
) -> tuple[RTNConfig | GPTQConfig, ActQuantConfig]:
    """``(weight config, activation config)`` of the scheme ``name`` (see the module docstring);
    ``observer`` / ``clip_percentile``: how a static scheme's scales are chosen (:class:`ActQuantConfig`)."""
    name = resolve_scheme(name)
    if name not in SCHEMES:
        names = ", ".join(SCHEMES + tuple(ALIASES))
        raise ValueError(f"[quantize] unknown scheme {name!r}; choose from {names}")
    if name in FP4_SCHEMES:
        if observer != "absmax":
            raise ValueError(
                f"[quantize] observer {observer!r} chooses a static per-tensor scale (--scheme "
                f"{' or '.join(STATIC_SCHEMES)}); {name}'s inputs have per-group scales computed at run time "
                f"(nvfp4's global scale is the absmax: its local scales absorb the range)"
            )
        weights = RTNConfig(bits=4, group_size=FP4_GROUP[name], sym=True, format=name)
        return weights, ActQuantConfig(format=name, dynamic=name == "mxfp4")
    if name.startswith("w8a8"):
        # per-channel int8 by GPTQ: act-order costs nothing in the layout with one group per row
        weights = GPTQConfig(bits=8, group_size=-1, sym=True, desc_act=True, true_sequential=True)
        fmt = "int8"
    else:
        weights, fmt = RTNConfig(bits=8, group_size=-1, sym=True, format="fp8"), "fp8"
    act = ActQuantConfig(
        format=fmt, dynamic=name not in STATIC_SCHEMES, observer=observer, clip_percentile=clip_percentile
    )
    return weights, act


def check_weights(name: str, config) -> None:
    """A W4A4 scheme's weights given as a config (``--method``): the scheme's own format, RTN or GPTQ."""
    from calibra.quant.config import MRGPTQConfig

    if name not in FP4_SCHEMES:
        raise ValueError(
            f"[quantize] scheme {name!r} is a complete recipe (its weights included): give either config or "
            f"scheme, not both (on the command line: --scheme without --method; only --scheme "
            f"{' / '.join(FP4_SCHEMES)} takes --method rtn or gptq for its weights)"
        )
    if isinstance(config, MRGPTQConfig):
        raise ValueError(
            f"[quantize] --scheme {name} with MR-GPTQ is not implemented: its Hadamard rotation would have to be "
            f"applied to the inputs online before their FP4 quantization (neither simulated nor exportable "
            f"yet); use --method rtn or gptq"
        )
    if not isinstance(config, (RTNConfig, GPTQConfig)) or config.format != name:
        raise ValueError(
            f"[quantize] --scheme {name} quantizes its weights to {name}: give an RTNConfig or GPTQConfig with "
            f"format={name!r} (on the command line --method rtn|gptq; --format, --bits and --group-size are "
            f"the scheme's), got {type(config).__name__} with format {getattr(config, 'format', None)!r}"
        )
    if getattr(config, "awq", False) or getattr(config, "needs_hessian", False) and isinstance(config, RTNConfig):
        raise ValueError(
            f"[quantize] --scheme {name}: AWQ and clip_metric 'output' are not combined with activation "
            f"quantization yet (they read unquantized inputs); drop --awq / use --clip mse"
        )


def check_kv_cache(kv_cache) -> str | None:
    if kv_cache is not None and kv_cache not in KV_CACHE_FORMATS:
        raise ValueError(
            f"[quantize] kv_cache must be one of {', '.join(KV_CACHE_FORMATS)} (or None), got {kv_cache!r}"
        )
    return kv_cache


__all__ = [
    "SCHEMES",
    "ALIASES",
    "STATIC_SCHEMES",
    "FP4_SCHEMES",
    "OBSERVERS",
    "KV_CACHE_FORMATS",
    "ActQuantConfig",
    "resolve_scheme",
    "scheme_configs",
    "check_weights",
    "check_kv_cache",
]
