"""FP8 KV cache: calibrated per-layer ``k_scale`` / ``v_scale`` and the simulation of the quantized cache.

What an engine stores (vLLM's ``fp8`` / ``fp8_e4m3`` KV cache with a compressed-tensors checkpoint's
``kv_cache_scheme``): each key and value *as written to the cache* -- after the k_proj/v_proj, any k-norm
and RoPE -- divided by its layer's static scale and rounded to E4M3; attention reads ``code * scale``.
The scale is one per layer and tensor (``strategy: tensor``): ``absmax / 448`` of what the layer wrote
over the calibration text (``calibra.quant.fp8``).

Both the observation and the simulation go through the one place where an attention module hands its
post-RoPE K/V to the cache: ``cache.update(key_states, value_states, layer_idx, ...)``. A forward pre-hook
on every attention module (as compressed-tensors' own ``QuantizedKVCache`` does) replaces the call's
cache by a small stand-in whose ``update`` records (calibration) or quantize-dequantizes (simulation) the
K/V and then hands them to the real cache when the call has one (generation), or returns them (a plain
forward: attention then reads exactly what the cache would hold).
"""

from __future__ import annotations

import torch

from calibra.compat.transformers import CACHE_KWARGS, cache_from_call, cache_kwarg
from calibra.quant.fp8 import absmax, fp8_fake_quant, fp8_scale

HOOKS_ATTR = "_calibra_kv_fp8_hooks"


class _CacheStandIn:
    """The cache an attention call sees: ``update`` passes K/V through ``fn`` and on to ``inner``."""

    def __init__(self, fn, inner):
        self._fn, self._inner = fn, inner

    def update(self, key_states, value_states, *args, **kwargs):
        k, v = self._fn(key_states, value_states)
        if self._inner is not None:
            return self._inner.update(k, v, *args, **kwargs)
        return k, v

    def __getattr__(self, name):
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _hook_attention(model, adapter, fn_of_layer) -> None:
    """Install the stand-in on every decoder layer's attention (removing earlier ones)."""
    remove(model)
    handles = []
    for i, layer in enumerate(adapter.layers):
        attn = adapter.attention(layer)
        name = cache_kwarg(attn)
        fn = fn_of_layer(i)

        def pre_hook(module, args, kwargs, fn=fn, name=name):
            inner = cache_from_call(kwargs)
            kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
            kwargs[name] = _CacheStandIn(fn, inner)
            return args, kwargs

        handles.append(attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
    setattr(model, HOOKS_ATTR, handles)


def remove(model) -> None:
    for h in getattr(model, HOOKS_ATTR, []):
        h.remove()
    if hasattr(model, HOOKS_ATTR):
        delattr(model, HOOKS_ATTR)


class KVRecorder:
    """Records each layer's K and V absmax (float32) while installed. ``mask()`` returns the current
    batch's token mask ``[batch, seq]`` (True = a real token) or None (every token counts)."""

    def __init__(self, model, adapter, mask=None):
        self.model, self.adapter = model, adapter
        self.mask = mask or (lambda: None)
        self.absmax: dict[int, list[torch.Tensor]] = {}
        self.tokens: dict[int, int] = {}

    def _fn(self, i: int):
        def record(k, v):
            m = self.mask()
            vals = []
            for x in (k, v):  # [batch, kv_heads, seq, head_dim]
                x = x.detach()
                if m is not None and tuple(m.shape) == (x.shape[0], x.shape[2]):
                    x = x.transpose(1, 2)[m.to(x.device, torch.bool)]
                vals.append(absmax(x.float()) if x.numel() else torch.zeros(()))
            old = self.absmax.get(i)
            self.absmax[i] = vals if old is None else [torch.maximum(a, b) for a, b in zip(old, vals)]
            n = int(m.sum()) if m is not None else k.shape[0] * k.shape[2]
            self.tokens[i] = self.tokens.get(i, 0) + n
            return k, v

        return record

    def __enter__(self):
        _hook_attention(self.model, self.adapter, self._fn)
        return self

    def __exit__(self, *exc):
        remove(self.model)

    def scales(self, dtype: torch.dtype) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (k_scale [1], v_scale [1])}`` in ``dtype``; every layer must have been seen."""
        missing = [i for i in range(len(self.adapter.layers)) if i not in self.absmax]
        if missing:
            raise ValueError(
                f"[quantize] the KV-cache calibration saw no keys/values of layer(s) {missing}; "
                f"the attention of this model does not write through the cache"
            )
        return {i: tuple(fp8_scale(a.to(dtype).reshape(1)) for a in self.absmax[i]) for i in sorted(self.absmax)}


def install(model, adapter, scales: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Quantize-dequantize every layer's K and V with its scales on each forward (and in generation)."""
    for i in range(len(adapter.layers)):
        if i not in scales:
            raise ValueError(f"[quantize] no KV-cache scales for layer {i}")

    def fn_of_layer(i):
        ks, vs = scales[i]
        cache = {}

        def quant(k, v):
            dev = k.device
            if dev not in cache:
                cache[dev] = (ks.to(dev), vs.to(dev))
            kd, vd = cache[dev]
            return fp8_fake_quant(k, kd), fp8_fake_quant(v, vd)

        return quant

    _hook_attention(model, adapter, fn_of_layer)


def scales_to_dict(adapter, scales) -> dict:
    """JSON form: ``{attention module path: {"k_scale": float, "v_scale": float}}``."""
    out = {}
    for i, (k, v) in scales.items():
        out[attention_path(adapter, i)] = {"k_scale": float(k.float()[0]), "v_scale": float(v.float()[0])}
    return out


def scales_from_dict(adapter, doc: dict, dtype: torch.dtype) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for i in range(len(adapter.layers)):
        e = doc[attention_path(adapter, i)]
        out[i] = (torch.tensor([e["k_scale"]], dtype=dtype), torch.tensor([e["v_scale"]], dtype=dtype))
    return out


def attention_path(adapter, index: int) -> str:
    """The attention module's path (``model.layers.3.self_attn``): where k_scale/v_scale live in a checkpoint."""
    layer = adapter.layers[index]
    attn = adapter.attention(layer)
    sub = next(n for n, m in layer.named_modules() if m is attn and n)
    return f"{adapter.layer_name(index)}.{sub}"


__all__ = ["KVRecorder", "install", "remove", "scales_to_dict", "scales_from_dict", "attention_path"]
