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
=================  =====================================================================================

``kv_cache="fp8"`` (``--kv-cache fp8``) is separate and combines with any weight scheme: calibrated
per-layer ``k_scale`` / ``v_scale`` (absmax / 448 of the keys and values as written to the cache, after
RoPE), and K/V quantize-dequantized with them in the simulation (``calibra.quant.kv_fp8``).

Every field is validated before a weight loads; the math lives in ``calibra.quant.fp8`` and
``calibra.quant.int8``.
"""

from __future__ import annotations

from dataclasses import dataclass

from calibra.quant.config import GPTQConfig, RTNConfig

SCHEMES = ("fp8", "fp8-dynamic", "w8a8", "w8a8-static")
ALIASES = {"int8": "w8a8"}
STATIC_SCHEMES = ("fp8", "w8a8-static")
OBSERVERS = ("absmax", "percentile")
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
      beyond it saturate at +-448 x scale).
    """

    format: str = "fp8"
    dynamic: bool = True
    observer: str = "absmax"
    clip_percentile: float = 99.99

    def validate(self) -> ActQuantConfig:
        if self.format not in ("fp8", "int8"):
            raise ValueError(f"[quantize] ActQuantConfig.format must be 'fp8' or 'int8', got {self.format!r}")
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
    "OBSERVERS",
    "KV_CACHE_FORMATS",
    "ActQuantConfig",
    "resolve_scheme",
    "scheme_configs",
    "check_kv_cache",
]
