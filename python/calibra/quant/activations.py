"""Activation quantization of quantized Linears' inputs: the static scales from calibration statistics,
and the simulation (forward pre-hooks that quantize-dequantize each input as the engine will).

Static scales come from the ``ranges`` observer (``calibra.calib.observers.RangeObserver``): per module
the per-channel min/max of every unpadded calibration token, reduced here to one absmax and
``scale = absmax / 448`` (FP8, ``calibra.quant.fp8``) or ``absmax / 127.5`` (INT8, ``calibra.quant.int8``)
in the model's dtype. Each :class:`InputQuant` names its ``format``; the hooks use that format's math.

MoE experts get their own scale when routing sent them tokens. An expert no calibration token reached
gets a **recorded fallback**, never a NaN or zero scale: the largest scale among its block's experts that
did see tokens, for the same projection. For ``gate_up`` that is exactly the absmax of the block's whole
input (every token is routed to some expert, so the union of the experts' inputs is the block's input),
so the fallback never clips a token the expert might get. A block no token reached at all is an error.

The simulation hooks a ``torch.nn.Linear`` by name. A fused-expert slice (``experts.gate_up_proj[e]``)
has no module of its own: while a fused experts module runs, a ``TorchFunctionMode`` sees each
``F.linear(x, W)`` whose ``W`` is a slice of its ``gate_up_proj`` / ``down_proj`` (transformers 5's
per-expert loop, run in place of the grouped-GEMM implementation transformers may dispatch to), finds
the expert the weight slice belongs to and quantizes ``x`` with that expert's scale (per token for dynamic
schemes, as vLLM's fused-MoE FP8 path does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibra.quant.fp4_act import mxfp4_fake_quant, nvfp4_fake_quant, nvfp4_global_scale
from calibra.quant.fp8 import fp8_fake_quant, fp8_fake_quant_dynamic, fp8_scale
from calibra.quant.int8 import int8_fake_quant, int8_fake_quant_dynamic, int8_scale

HOOKS_ATTR = "_calibra_input_quant_hooks"
FORMATS = ("fp8", "int8", "nvfp4", "mxfp4")
# format -> (static scale of an absmax, static fake-quant, dynamic fake-quant); None where the format has no
# such variant. nvfp4's static "scale" is its global scale (a float32 divisor, 448 * 6 / absmax) under
# dynamic per-16 local scales; mxfp4 is dynamic only (per-32 E8M0 scales at run time)
_MATH = {
    "fp8": (fp8_scale, fp8_fake_quant, fp8_fake_quant_dynamic),
    "int8": (int8_scale, int8_fake_quant, int8_fake_quant_dynamic),
    "nvfp4": (nvfp4_global_scale, nvfp4_fake_quant, None),
    "mxfp4": (None, None, mxfp4_fake_quant),
}
SCALE_DTYPE = {"nvfp4": torch.float32}  # a static scale's dtype where it is not the model's


def static_scale(amax: torch.Tensor, dtype: torch.dtype, format: str) -> torch.Tensor:
    """The static input scale ``[1]`` of the magnitude ``amax`` in ``format`` (model dtype ``dtype``)."""
    return _MATH[format][0](amax.to(SCALE_DTYPE.get(format, dtype)).reshape(1))


@dataclass
class InputQuant:
    """How one quantized Linear's input is quantized."""

    dynamic: bool
    scale: torch.Tensor | None
    """Static: the per-tensor scale, shape ``[1]``, in the model's dtype (nvfp4: the float32 global scale
    that divides the per-16 local scales, compressed-tensors' ``input_global_scale``); None when dynamic."""
    tokens: int = 0
    """Calibration tokens behind a static scale (0 for dynamic, or for a fallback)."""
    fallback: str | None = None
    """Why a static scale is not the module's own (an expert without tokens), or None."""
    format: str = "fp8"
    """The input's number format: "fp8" (E4M3), "int8" (symmetric), "nvfp4" or "mxfp4" (E2M1 groups)."""
    clip: float | None = None
    """``--act-observer mse``: the kept shrink factor of the absmax (``calibra.quant.act_mse``), else None."""

    def to_dict(self) -> dict:
        d = {
            "format": self.format,
            "dynamic": self.dynamic,
            "scale": None if self.scale is None else float(self.scale.float().reshape(-1)[0]),
            "tokens": self.tokens,
            "fallback": self.fallback,
        }
        if self.clip is not None:
            d["clip"] = self.clip
        return d

    @classmethod
    def from_dict(cls, d: dict, dtype: torch.dtype) -> InputQuant:
        fmt = d.get("format", "fp8")  # folders written before INT8 inputs existed hold FP8 only
        if fmt not in FORMATS:
            raise ValueError(f"[quantize] input quantization format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        scale = None if d["scale"] is None else torch.tensor([d["scale"]], dtype=SCALE_DTYPE.get(fmt, dtype))
        return cls(
            dynamic=d["dynamic"],
            scale=scale,
            tokens=d.get("tokens", 0),
            fallback=d.get("fallback"),
            format=fmt,
            clip=d.get("clip"),
        )


def _absmax_of(stats, key: str, clip_percentile: float | None = None) -> torch.Tensor | None:
    """The magnitude a static scale covers: the absmax of the module's inputs, or (``clip_percentile``)
    that percentile of them from the range histogram (``max(|p_lo|, p_hi)``, never above the absmax)."""
    lo, hi = stats.tensors.get(f"ranges/min/{key}"), stats.tensors.get(f"ranges/max/{key}")
    if lo is None or hi is None or stats.count("ranges", key) == 0:
        return None
    amax = torch.maximum((-lo.float().min()).clamp(min=0), hi.float().max().clamp(min=0))
    if clip_percentile is None:
        return amax
    from calibra.calib.observers import percentile

    hist = stats.tensors[f"ranges/hist/{key}"]
    p = max(-percentile(hist, 100.0 - clip_percentile), percentile(hist, clip_percentile), 0.0)
    return torch.minimum(amax, torch.tensor(p, dtype=torch.float32))


def _expert_group(stats_key: str) -> tuple[str, str]:
    """``(block key, projection)`` of an expert statistics key ``<block>.experts.<e>.<proj>``."""
    block, rest = stats_key.rsplit(".experts.", 1)
    return block, rest.split(".", 1)[1]


def static_input_quant(
    stats,
    targets,
    dtype: torch.dtype,
    clip_percentile: float | None = None,
    format: str = "fp8",
    shrink: dict[str, float] | None = None,
) -> dict[str, InputQuant]:
    """Static per-tensor input scales of ``targets`` (``calibra.quant.apply.Target``) from ``stats`` (with
    the ``ranges`` observer): absmax / 448 (``format`` "int8": / 127.5), or with ``clip_percentile`` that
    percentile of the magnitudes, or with ``shrink`` (stats key -> factor, ``calibra.quant.act_mse``) that
    fraction of the absmax; experts without tokens get the fallback of the module docstring."""
    own: dict[str, tuple[torch.Tensor | None, int]] = {}
    for t in targets:
        amax = _absmax_of(stats, t.stats_key, clip_percentile)
        if amax is not None and shrink and t.stats_key in shrink:
            amax = amax * shrink[t.stats_key]
        own[t.name] = (amax, stats.count("ranges", t.stats_key))
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
        out[t.name] = InputQuant(
            dynamic=False,
            scale=static_scale(amax, dtype, format),
            tokens=tokens,
            fallback=why,
            format=format,
            clip=None if shrink is None or why else shrink.get(t.stats_key, 1.0),
        )
    return out


def dynamic_input_quant(names, format: str = "fp8") -> dict[str, InputQuant]:
    """Per-token dynamic quantization for every module in ``names``."""
    return {n: InputQuant(dynamic=True, scale=None, format=format) for n in names}


def _pre_hook(iq: InputQuant):
    _, fake_quant, fake_quant_dynamic = _MATH[iq.format]
    if iq.dynamic:

        def hook(module, args):
            return (fake_quant_dynamic(args[0]),) + tuple(args[1:])

    else:
        cache = {}

        def hook(module, args):
            x = args[0]
            s = cache.get(x.device)
            if s is None:
                s = cache[x.device] = iq.scale.to(x.device)
            return (fake_quant(x, s),) + tuple(args[1:])

    return hook


class _FusedExpertInputs(torch.overrides.TorchFunctionMode):
    """Active while one fused experts module runs: quantizes the input of every ``F.linear`` on a slice of
    its 3-D expert weights with that expert's :class:`InputQuant`."""

    def __init__(self, experts, quant: dict[tuple[str, int], InputQuant]):
        super().__init__()
        self.experts, self.quant = experts, quant
        self.hooks = {k: _pre_hook(iq) for k, iq in quant.items()}
        self.seen = 0  # linears quantized in the current forward (a check for tests and debugging)
        self.pending: dict[int, tuple] = {}  # id(weight copy) -> (copy, (proj, expert)) until its linear

    def _which(self, w: torch.Tensor):
        for proj in ("gate_up_proj", "down_proj"):
            p = getattr(self.experts, proj)
            if (
                w.dim() == 2
                and tuple(w.shape) == tuple(p.shape[1:])
                and w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
            ):
                return proj, (w.storage_offset() - p.storage_offset()) // p.stride(0)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and args:
            # ``gate_up_proj[expert_idx]`` with a 0-d index tensor copies: remember which expert the copy is
            proj = next((n for n in ("gate_up_proj", "down_proj") if args[0] is getattr(self.experts, n)), None)
            out = func(*args, **kwargs)
            idx = args[1] if len(args) > 1 else None
            if proj is not None and (isinstance(idx, int) or (torch.is_tensor(idx) and idx.numel() == 1)):
                self.pending[id(out)] = (out, (proj, int(idx)))
            return out
        if func is torch.nn.functional.linear and len(args) >= 2:
            entry = self.pending.pop(id(args[1]), None)
            key = entry[1] if entry is not None and entry[0] is args[1] else self._which(args[1])
            hook = self.hooks.get(key) if key is not None else None
            if hook is not None:
                args = hook(None, args)
                self.seen += 1
        return func(*args, **kwargs)


def _install_fused(mods: dict, names: list[str], quant: dict[str, InputQuant]) -> tuple[list, list[str]]:
    """Wrap the forward of every fused experts module some of ``names`` belong to; returns
    ``(undo callables, names left without simulation)``."""
    from calibra.compat.transformers import expert_weights_transposed, is_fused_experts

    groups: dict[str, dict] = {}
    left = []
    for name in names:
        if ".experts." not in name:
            left.append(name)
            continue
        block, rest = name.rsplit(".experts.", 1)
        e, proj = rest.split(".", 1)
        experts = mods.get(f"{block}.experts")
        if (
            experts is None
            or not is_fused_experts(experts)
            or expert_weights_transposed(experts)  # GPT-OSS, Aria compute x @ W, not F.linear: no simulation here
            or proj not in ("gate_up_proj", "down_proj")
        ):
            left.append(name)
            continue
        groups.setdefault(f"{block}.experts", {})[(proj, int(e))] = quant[name]
    undo = []
    for path, q in groups.items():
        experts = mods[path]
        mode = _FusedExpertInputs(experts, q)
        # transformers 5 dispatches fused experts to an implementation chosen by the config (grouped_mm,
        # ...); the simulation runs the class's own per-expert loop (``__wrapped__`` of that dispatcher)
        orig = getattr(type(experts).forward, "__wrapped__", type(experts).forward)

        def forward(*args, _orig=orig, _mod=experts, _mode=mode, **kwargs):
            _mode.seen = 0
            try:
                with _mode:
                    return _orig(_mod, *args, **kwargs)
            finally:
                _mode.pending.clear()

        experts.forward = forward
        undo.append(lambda m=experts: m.__dict__.pop("forward", None))
    return undo, left


def install(model, quant: dict[str, InputQuant]) -> list[str]:
    """Quantize-dequantize the input of every named Linear (or fused-expert slice) of ``model`` on each
    forward (replacing what an earlier call installed). Returns the names it cannot simulate."""
    remove(model)
    mods = dict(model.named_modules())
    handles, missing = [], []
    for name, iq in quant.items():
        mod = mods.get(name)
        if not isinstance(mod, torch.nn.Linear):
            missing.append(name)
            continue
        handles.append(mod.register_forward_pre_hook(_pre_hook(iq)))
    undo, missing = _install_fused(mods, missing, quant)
    setattr(model, HOOKS_ATTR, handles + [_Undo(f) for f in undo])
    return missing


class _Undo:
    def __init__(self, fn):
        self.fn = fn

    def remove(self):
        self.fn()


def remove(model) -> None:
    """Remove the hooks :func:`install` put on ``model`` (none: nothing happens)."""
    for h in getattr(model, HOOKS_ATTR, []):
        h.remove()
    if hasattr(model, HOOKS_ATTR):
        delattr(model, HOOKS_ATTR)


__all__ = ["InputQuant", "static_input_quant", "dynamic_input_quant", "install", "remove"]
