"""Activation quantization of quantized Linears' inputs: the static scales from calibration statistics,
and the simulation (forward pre-hooks that quantize-dequantize each input as the engine will).

Static scales come from the ``ranges`` observer (``calibra.calib.observers.RangeObserver``): per module
the per-channel min/max of every unpadded calibration token, reduced here to one absmax and
``scale = absmax / 448`` in the model's dtype (``calibra.quant.fp8``).

MoE experts get their own scale when routing sent them tokens. An expert no calibration token reached
gets a **recorded fallback**, never a NaN or zero scale: the largest scale among its block's experts that
did see tokens, for the same projection. For ``gate_up`` that is exactly the absmax of the block's whole
input (every token is routed to some expert, so the union of the experts' inputs is the block's input),
so the fallback never clips a token the expert might get. A block no token reached at all is an error.

The simulation hooks a ``torch.nn.Linear`` by name. A fused-expert slice (``experts.gate_up_proj[e]``)
has no module of its own to hook: its scale is computed and written, and :func:`install` returns such
names as not simulated (the report lists them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibra.quant.fp8 import fp8_fake_quant, fp8_fake_quant_dynamic, fp8_scale

HOOKS_ATTR = "_calibra_input_quant_hooks"


@dataclass
class InputQuant:
    """How one quantized Linear's input is quantized."""

    dynamic: bool
    scale: torch.Tensor | None
    """Static: the per-tensor scale, shape ``[1]``, in the model's dtype; None when dynamic."""
    tokens: int = 0
    """Calibration tokens behind a static scale (0 for dynamic, or for a fallback)."""
    fallback: str | None = None
    """Why a static scale is not the module's own (an expert without tokens), or None."""

    def to_dict(self) -> dict:
        return {
            "dynamic": self.dynamic,
            "scale": None if self.scale is None else float(self.scale.float().reshape(-1)[0]),
            "tokens": self.tokens,
            "fallback": self.fallback,
        }

    @classmethod
    def from_dict(cls, d: dict, dtype: torch.dtype) -> InputQuant:
        scale = None if d["scale"] is None else torch.tensor([d["scale"]], dtype=dtype)
        return cls(dynamic=d["dynamic"], scale=scale, tokens=d.get("tokens", 0), fallback=d.get("fallback"))


def _absmax_of(stats, key: str) -> torch.Tensor | None:
    lo, hi = stats.tensors.get(f"ranges/min/{key}"), stats.tensors.get(f"ranges/max/{key}")
    if lo is None or hi is None or stats.count("ranges", key) == 0:
        return None
    return torch.maximum((-lo.float().min()).clamp(min=0), hi.float().max().clamp(min=0))


def _expert_group(stats_key: str) -> tuple[str, str]:
    """``(block key, projection)`` of an expert statistics key ``<block>.experts.<e>.<proj>``."""
    block, rest = stats_key.rsplit(".experts.", 1)
    return block, rest.split(".", 1)[1]


def static_input_quant(stats, targets, dtype: torch.dtype) -> dict[str, InputQuant]:
    """Static per-tensor input scales of ``targets`` (``calibra.quant.apply.Target``) from ``stats`` (with
    the ``ranges`` observer); experts without tokens get the fallback of the module docstring."""
    own: dict[str, tuple[torch.Tensor | None, int]] = {}
    for t in targets:
        own[t.name] = (_absmax_of(stats, t.stats_key), stats.count("ranges", t.stats_key))
    siblings: dict[tuple[str, str], list[torch.Tensor]] = {}
    for t in targets:
        if t.expert and own[t.name][0] is not None:
            siblings.setdefault(_expert_group(t.stats_key), []).append(own[t.name][0])
    out = {}
    for t in targets:
        amax, tokens = own[t.name]
        why = None
        if amax is None:
            if not t.expert:
                raise ValueError(
                    f"[quantize] no calibration token reached the input of {t.name}: its static activation "
                    f"scale cannot be calibrated; use more calibration samples or --scheme fp8-dynamic"
                )
            group = _expert_group(t.stats_key)
            peers = siblings.get(group)
            if not peers:
                raise ValueError(
                    f"[quantize] no calibration token reached any expert of {group[0]}: its experts' static "
                    f"activation scales cannot be calibrated; use more calibration samples"
                )
            amax = torch.stack(peers).max()
            why = (
                f"no calibration token reached this expert: the largest {group[1]} input scale of the "
                f"{len(peers)} experts of its block that saw tokens"
            )
        out[t.name] = InputQuant(dynamic=False, scale=fp8_scale(amax.to(dtype).reshape(1)), tokens=tokens, fallback=why)
    return out


def dynamic_input_quant(names) -> dict[str, InputQuant]:
    """Per-token dynamic quantization for every module in ``names``."""
    return {n: InputQuant(dynamic=True, scale=None) for n in names}


def _pre_hook(iq: InputQuant):
    if iq.dynamic:

        def hook(module, args):
            return (fp8_fake_quant_dynamic(args[0]),) + tuple(args[1:])

    else:
        cache = {}

        def hook(module, args):
            x = args[0]
            s = cache.get(x.device)
            if s is None:
                s = cache[x.device] = iq.scale.to(x.device)
            return (fp8_fake_quant(x, s),) + tuple(args[1:])

    return hook


def install(model, quant: dict[str, InputQuant]) -> list[str]:
    """Quantize-dequantize the input of every named Linear of ``model`` on each forward (replacing hooks an
    earlier call installed). Returns the names that have no module to hook (fused-expert slices)."""
    remove(model)
    mods = dict(model.named_modules())
    handles, missing = [], []
    for name, iq in quant.items():
        mod = mods.get(name)
        if not isinstance(mod, torch.nn.Linear):
            missing.append(name)
            continue
        handles.append(mod.register_forward_pre_hook(_pre_hook(iq)))
    setattr(model, HOOKS_ATTR, handles)
    return missing


def remove(model) -> None:
    """Remove the hooks :func:`install` put on ``model`` (none: nothing happens)."""
    for h in getattr(model, HOOKS_ATTR, []):
        h.remove()
    if hasattr(model, HOOKS_ATTR):
        delattr(model, HOOKS_ATTR)


__all__ = ["InputQuant", "static_input_quant", "dynamic_input_quant", "install", "remove"]
