"""A quantized model read one module at a time, for models larger than memory.

Two layouts are read: calibra's own folder (``calibra.quant.save``: :class:`DequantizedStore`) and the
weight-only compressed-tensors checkpoints calibra exports (``pack-quantized`` int, ``nvfp4-pack-quantized``:
:class:`CompressedTensorsStore`). Each presents the tensors under the model's parameter names: a quantized
weight ``<name>.weight`` is read as its codes, scales (zeros, g_idx, global scale) and dequantized --
rotated back when MR-GPTQ rotated it -- as :func:`calibra.quant.save.load` (or compressed-tensors'
decompressor) does for the whole model; every other tensor is read as stored. A
:class:`calibra.io.streamed.StreamedModel` over either loads and releases modules like it does over a plain
checkpoint, so the layer-by-layer evaluation (``calibra.eval.streamed``) measures the quantized model --
for an export, the model an engine runs -- without ever holding it whole.
"""

from __future__ import annotations

import json
import re

import torch

from calibra.io.model_reader import ModelFolder
from calibra.io.streamed import StreamedModel, WeightStore, weightless_model
from calibra.ops import unpack
from calibra.quant.result import QuantizedLayer
from calibra.quant.save import MANIFEST, dequantize_module


class _Fields:
    """``tensors[key]`` / ``tensors.get(key)`` over a store, read on access (what dequantize_module reads)."""

    def __init__(self, store: WeightStore):
        self.store = store

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.store.read(key)

    def get(self, key: str, default=None):
        return self.store.read(key) if key in self.store else default


_EXPERT_SLICE = re.compile(r"^(?P<block>.+)\.experts\.(?P<e>\d+)\.(?P<proj>gate_up_proj|down_proj)$")


class DequantizedStore:
    """The tensors of a calibra quantized folder under the model's parameter names (see the module docstring).

    A fused expert parameter (``<block>.experts.gate_up_proj [E, 2I, H]``, or whatever parameters the family's
    layout keeps its experts in: ``compat.transformers.expert_params``) is assembled from its quantized
    experts' slices (``<block>.experts.<e>.gate_up_proj``, dequantized ``[out, in]``), placed as the layout
    places them (``compat.transformers.store_expert_slice`` on the weightless ``model``'s experts module:
    transposed, split into DBRX's rows, Nemotron-H's ``up_proj``), over the stored whole parameter when some
    experts stayed dense -- as ``calibra.quant.save.load`` fills it."""

    def __init__(self, folder: ModelFolder, manifest: dict, model, transposed: frozenset = frozenset()):
        from calibra.compat.transformers import expert_params, experts_module, fused_expert_count

        self.raw = WeightStore(folder)
        self.folder = folder
        self.transposed = transposed  # GPT-2 Conv1D modules: their parameter is [in, out]
        self.modules: dict[str, dict] = manifest["modules"]
        paths = {id(m): n for n, m in model.named_modules()}
        # model parameter -> (experts module, its path, its name relative to it, {(proj, expert): slice module})
        self.fused: dict[str, tuple] = {}
        for m in self.modules:
            hit = _EXPERT_SLICE.match(m)
            if hit is None:
                continue
            experts = experts_module(model, f"{hit.group('block')}.experts")
            for rel in expert_params(experts, hit.group("proj")):
                key = f"{paths[id(experts)]}.{rel}"
                entry = self.fused.setdefault(key, (experts, paths[id(experts)], rel, {}))
                entry[3][(hit.group("proj"), int(hit.group("e")))] = m
        for key, (experts, _, _, slices) in self.fused.items():
            seen = {e for _, e in slices}
            if key not in self.raw and len(seen) != fused_expert_count(experts):
                raise ValueError(f"[eval] {folder.path}: {key} is neither stored whole nor quantized for every expert")

    def _quantized(self, name: str) -> str | None:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        return module if module in self.modules else None

    def __contains__(self, name: str) -> bool:
        return name in self.raw or self._quantized(name) is not None or name in self.fused

    def read(self, name: str, count: int | None = None) -> torch.Tensor:
        if name in self.fused:
            w = self._fused(name)
            return w if count is None else w.reshape(-1)[:count]
        module = self._quantized(name)
        if module is None:
            return self.raw.read(name, count)
        w = dequantize_module(_Fields(self.raw), module, self.modules[module])
        if module in self.transposed:
            w = w.t().contiguous()
        return w if count is None else w.reshape(-1)[:count]

    def _fused(self, name: str) -> torch.Tensor:
        from calibra.compat.transformers import expert_params, store_expert_slice

        experts, path, rel, slices = self.fused[name]
        params: dict[str, torch.Tensor] = {}
        for (proj, e), module in sorted(slices.items()):
            w = dequantize_module(_Fields(self.raw), module, self.modules[module])
            for p in expert_params(experts, proj):  # DBRX's gate_up slice spans two parameters
                if p not in params:
                    full = f"{path}.{p}"
                    shape = tuple(experts.get_parameter(p).shape)
                    params[p] = (
                        self.raw.read(full).to(w.dtype) if full in self.raw else torch.empty(shape, dtype=w.dtype)
                    )
            store_expert_slice(experts, proj, e, w.to(params[expert_params(experts, proj)[0]].dtype), params)
        return params[rel]

    @property
    def bytes_read(self) -> int:
        return self.raw.bytes_read


# compressed-tensors formats this reader dequantizes (what calibra.export.compressed_tensors writes)
CT_FORMATS = ("pack-quantized", "nvfp4-pack-quantized")


def ct_weight_scheme(quantization_config: dict, where) -> dict:
    """The one weight scheme of a weight-only compressed-tensors config, or ValueError saying what else it holds.

    Only what a layer-by-layer reader can rebuild from the tensors alone is accepted: every config group
    with the same weight scheme (so no per-module target matching is needed), no activation or KV-cache
    quantization, no sparsity, no transforms, no act-order."""

    def refuse(what: str):
        raise ValueError(
            f"[eval] {where}: {what}; this compressed-tensors checkpoint cannot be read layer by layer (the "
            f"supported layouts are weight-only {' / '.join(CT_FORMATS)} with one scheme). Evaluate it whole "
            f"(--no-stream)"
        )

    q = quantization_config
    if q.get("quant_method") != "compressed-tensors":
        refuse(f"quant_method is {q.get('quant_method')!r}")
    groups = list((q.get("config_groups") or {}).values())
    if not groups:
        refuse("it has no config_groups")
    schemes = []
    for g in groups:
        fmt = g.get("format") or q.get("format")
        if fmt not in CT_FORMATS:
            refuse(f"its format is {fmt!r}")
        if g.get("input_activations") or g.get("output_activations"):
            refuse("it quantizes activations")
        w = dict(g.get("weights") or {})
        if not w or w.get("actorder") or w.get("dynamic"):
            refuse(f"its weight scheme is {w}")
        keys = ("type", "num_bits", "symmetric", "strategy", "group_size")
        schemes.append((fmt, *(w.get(k) for k in keys)))
    if len(set(schemes)) != 1:
        refuse(f"its config groups use different weight schemes ({sorted(set(map(str, schemes)))})")
    if q.get("kv_cache_scheme") or q.get("sparsity_config") or q.get("transform_config"):
        refuse("it holds a KV-cache scheme, a sparsity config or transforms")
    fmt, kind, bits, sym, strategy, gs = schemes[0]
    if fmt == "nvfp4-pack-quantized" and (kind, bits) != ("float", 4):
        refuse(f"nvfp4 weights must be 4-bit float, got {kind} {bits}-bit")
    if fmt == "pack-quantized" and (kind != "int" or strategy not in ("group", "channel")):
        refuse(f"pack-quantized weights must be int per group or channel, got {kind} per {strategy}")
    return {"format": fmt, "bits": int(bits), "symmetric": bool(sym), "group_size": -1 if strategy == "channel" else gs}


class CompressedTensorsStore:
    """A weight-only compressed-tensors checkpoint's tensors under the model's parameter names.

    ``<m>.weight`` of a quantized Linear is rebuilt from ``<m>.weight_packed`` / ``weight_scale`` (and
    ``weight_zero_point`` or ``weight_global_scale``) with compressed-tensors' conventions (FORMATS.md
    section 2; stored codes and zero points carry the ``+2^(b-1)`` offset, which is calibra's unsigned
    convention, so they are used as stored) and the dequantization of :class:`QuantizedLayer`.
    """

    def __init__(self, folder: ModelFolder, quantization_config: dict, dtype: torch.dtype):
        self.raw = WeightStore(folder)
        self.folder = folder
        self.scheme = ct_weight_scheme(quantization_config, folder.path)
        # what the weights are dequantized to: the evaluation's dtype, as transformers does when it loads
        # the export with that dtype (and as a whole-model job evaluates its quantized model)
        self.dtype = dtype

    def _quantized(self, name: str) -> str | None:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        return module if module is not None and f"{module}.weight_packed" in self.raw else None

    def __contains__(self, name: str) -> bool:
        return name in self.raw or self._quantized(name) is not None

    def read(self, name: str, count: int | None = None) -> torch.Tensor:
        module = self._quantized(name)
        if module is None:
            return self.raw.read(name, count)
        w = self.layer(module).dequantize()
        return w if count is None else w.reshape(-1)[:count]

    def layer(self, module: str) -> QuantizedLayer:
        """The :class:`QuantizedLayer` stored for ``module`` (codes unpacked)."""
        s, read = self.scheme, self.raw.read
        packed, scales = read(f"{module}.weight_packed"), read(f"{module}.weight_scale")
        zeros = global_scale = None
        if s["format"] == "nvfp4-pack-quantized":
            fmt, bits = "nvfp4", 4
            codes = unpack(packed, 4, length=packed.shape[1] * 2)
            global_scale = read(f"{module}.weight_global_scale").float().reshape(1)
        else:
            fmt, bits = "int", s["bits"]
            out, n = (int(v) for v in read(f"{module}.weight_shape").tolist())
            codes = unpack(packed, bits, length=n)
            if s["symmetric"]:
                zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8)
            else:
                zeros = unpack(read(f"{module}.weight_zero_point"), bits, length=out, dim=0)
        return QuantizedLayer(
            name=module,
            method="export",
            format=fmt,
            bits=bits,
            group_size=16 if fmt == "nvfp4" else s["group_size"],
            symmetric=s["symmetric"],
            codes=codes,
            scales=scales,
            zeros=zeros,
            g_idx=None,
            global_scale=global_scale,
            weight=torch.empty(0, dtype=self.dtype),
            rotation=None,
            log=None,
        )

    @property
    def bytes_read(self) -> int:
        return self.raw.bytes_read


class CheckpointNames:
    """A store's tensors under the model's in-memory names when the checkpoint holds transformers' on-disk
    ones (an engine export of an MoE model): a renamed tensor (Mixtral's ``block_sparse_moe.gate``) is read
    under its disk name, and a fused expert tensor (``experts.gate_up_proj [E, 2I, H]``) is assembled from
    the per-expert ``.weight`` tensors -- dequantized by the inner store when they are quantized -- at the
    rows transformers' own conversion puts them (``compat.transformers.fused_expert_layout``)."""

    def __init__(self, inner, model):
        self.inner, self.model, self.folder = inner, model, inner.folder
        self._where: dict[str, object] = {}

    def _tensor(self, name: str):
        owner, _, attr = name.rpartition(".")
        try:
            mod = self.model.get_submodule(owner) if owner else self.model
        except AttributeError:
            return None, None
        return mod, getattr(mod, attr, None)

    def _source(self, name: str):
        """``name`` itself, its on-disk name, a fused expert layout, or None (not in the checkpoint)."""
        if name in self._where:
            return self._where[name]
        from calibra.compat.transformers import disk_name, fused_expert_layout, is_fused_experts

        src = name if name in self.inner else None
        mod, t = self._tensor(name) if src is None else (None, None)
        if isinstance(t, torch.Tensor) and is_fused_experts(mod) and name.endswith(("gate_up_proj", "down_proj")):
            try:
                layout = fused_expert_layout(self.model, name)
            except ValueError:
                layout = None
            if layout and all(f"{d}.weight" in self.inner for cut in layout.values() for d, _, _ in cut):
                src = layout
        elif isinstance(t, torch.Tensor):
            disk = disk_name(self.model, name, tuple(t.shape))
            src = disk if disk is not None and disk in self.inner else None
        self._where[name] = src
        return src

    def __contains__(self, name: str) -> bool:
        return self._source(name) is not None

    def read(self, name: str, count: int | None = None) -> torch.Tensor:
        src = self._source(name)
        if not isinstance(src, dict):
            return self.inner.read(name if src is None else src, count)
        out = None
        for e, cut in src.items():
            for disk, r0, r1 in cut:
                w = self.inner.read(f"{disk}.weight")
                if out is None:
                    out = torch.empty(tuple(self.model.get_parameter(name).shape), dtype=w.dtype)
                out[e, r0:r1] = w
        return out if count is None else out.reshape(-1)[:count]

    @property
    def bytes_read(self) -> int:
        return self.inner.bytes_read


def open_streamed_quantized(folder: ModelFolder, model_config, dtype: torch.dtype) -> StreamedModel:
    """The streamed simulated model of a quantized ``folder`` -- calibra's own or a weight-only
    compressed-tensors export (:func:`ct_weight_scheme`) -- its weights dequantized as each module loads."""
    from calibra.models.linear import is_conv1d

    # the folder's own config says how it was quantized (``model_config`` may be the source model's)
    saved = json.loads((folder.path / "config.json").read_text(encoding="utf-8"))
    qcfg = saved.get("quantization_config") or saved.get("compression_config")
    model = weightless_model(_without_quantization(model_config))
    if (folder.path / MANIFEST).is_file():
        manifest = json.loads((folder.path / MANIFEST).read_text(encoding="utf-8"))
        if "activations" in manifest or "kv_cache" in manifest:  # the layer-by-layer model has no simulation hooks
            raise ValueError(
                f"[eval] {folder.path}: activation / KV-cache quantization is not simulated layer by layer yet; "
                f"evaluate it whole (--no-stream)"
            )
        transposed = frozenset(n for n, m in model.named_modules() if is_conv1d(m))
        store = DequantizedStore(folder, manifest, model, transposed)
    elif qcfg:  # (engine exports refuse GPT-2's Conv1D, so nothing is transposed here)
        store = CheckpointNames(CompressedTensorsStore(folder, qcfg, dtype), model)
    else:
        raise ValueError(f"[eval] {folder.path}: neither calibra's quantized folder nor a quantized checkpoint")
    return StreamedModel(model, store, dtype)


def _without_quantization(model_config):
    """The config without ``quantization_config`` (the weightless model is a plain one; its weights are
    dequantized by the store, not by transformers' quantizer)."""
    import copy

    if getattr(model_config, "quantization_config", None) is None:
        return model_config
    cfg = copy.deepcopy(model_config)
    del cfg.quantization_config
    return cfg


__all__ = [
    "CheckpointNames",
    "CompressedTensorsStore",
    "DequantizedStore",
    "ct_weight_scheme",
    "open_streamed_quantized",
]
