"""Activation-quantized schemes: complete recipes selected by one name (``--scheme NAME``).

=================  =====================================================================================
``fp8-dynamic``    FP8 E4M3 weights, one scale per output channel (RTN, absmax / 448); every quantized
                   Linear's input quantized to FP8 per token at run time (data-free). compressed-tensors'
                   ``FP8_DYNAMIC`` preset.
``fp8``            the same weights; every quantized Linear's input quantized to FP8 with one *static*
                   per-tensor scale calibrated on the calibration text (absmax / 448 of what the module
                   saw). compressed-tensors' ``FP8`` preset with per-channel weights.
=================  =====================================================================================

``kv_cache="fp8"`` (``--kv-cache fp8``) is separate and combines with any weight scheme: calibrated
per-layer ``k_scale`` / ``v_scale`` (absmax / 448 of the keys and values as written to the cache, after
RoPE), and K/V quantize-dequantized with them in the simulation (``calibra.quant.kv_fp8``).

Every field is validated before a weight loads; the math lives in ``calibra.quant.fp8``.
"""

from __future__ import annotations

from dataclasses import dataclass

from calibra.quant.config import RTNConfig

SCHEMES = ("fp8", "fp8-dynamic")
KV_CACHE_FORMATS = ("fp8",)


@dataclass(frozen=True)
class ActQuantConfig:
    """How every quantized Linear's input is quantized.

    - ``format``: "fp8" (E4M3).
    - ``dynamic``: True = one scale per token computed at run time; False = one static per-tensor scale
      from calibration (``observer``).
    - ``observer``: how a static scale is chosen from the calibration statistics: "absmax" (the largest
      magnitude the module's input reached).
    """

    format: str = "fp8"
    dynamic: bool = True
    observer: str = "absmax"

    def validate(self) -> ActQuantConfig:
        if self.format != "fp8":
            raise ValueError(f"[quantize] ActQuantConfig.format must be 'fp8', got {self.format!r}")
        if not isinstance(self.dynamic, bool):
            raise ValueError(f"[quantize] ActQuantConfig.dynamic must be a bool, got {self.dynamic!r}")
        if self.observer != "absmax":
            raise ValueError(f"[quantize] ActQuantConfig.observer must be 'absmax', got {self.observer!r}")
        return self

    @property
    def needs_data(self) -> bool:
        return not self.dynamic

    def to_dict(self) -> dict:
        return {"format": self.format, "dynamic": self.dynamic, "observer": None if self.dynamic else self.observer}


def scheme_configs(name: str) -> tuple[RTNConfig, ActQuantConfig]:
    """``(weight config, activation config)`` of the scheme ``name`` (see the module docstring)."""
    if name not in SCHEMES:
        raise ValueError(f"[quantize] unknown scheme {name!r}; choose from {', '.join(SCHEMES)}")
    weights = RTNConfig(bits=8, group_size=-1, sym=True, format="fp8")
    return weights, ActQuantConfig(format="fp8", dynamic=name == "fp8-dynamic")


def check_kv_cache(kv_cache) -> str | None:
    if kv_cache is not None and kv_cache not in KV_CACHE_FORMATS:
        raise ValueError(
            f"[quantize] kv_cache must be one of {', '.join(KV_CACHE_FORMATS)} (or None), got {kv_cache!r}"
        )
    return kv_cache


__all__ = ["SCHEMES", "KV_CACHE_FORMATS", "ActQuantConfig", "scheme_configs", "check_kv_cache"]
