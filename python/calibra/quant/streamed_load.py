"""calibra's quantized folder (``calibra.quant.save``) read one module at a time, for models larger than memory.

:class:`DequantizedStore` presents the folder's tensors under the model's parameter names: a quantized
weight ``<name>.weight`` is read as its codes, scales (zeros, g_idx, global scale) and dequantized --
rotated back when MR-GPTQ rotated it -- exactly as :func:`calibra.quant.save.load` does for the whole
model; every other tensor is read as stored. A :class:`calibra.io.streamed.StreamedModel` over it loads
and releases modules like it does over a plain checkpoint, so the layer-by-layer evaluation
(``calibra.eval.streamed``) measures the quantized model without ever holding it whole.
"""

from __future__ import annotations

import json

import torch

from calibra.io.model_reader import ModelFolder
from calibra.io.streamed import StreamedModel, WeightStore, weightless_model
from calibra.quant.save import MANIFEST, dequantize_module


class _Fields:
    """``tensors[key]`` / ``tensors.get(key)`` over a store, read on access (what dequantize_module reads)."""

    def __init__(self, store: WeightStore):
        self.store = store

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.store.read(key)

    def get(self, key: str, default=None):
        return self.store.read(key) if key in self.store else default


class DequantizedStore:
    """The tensors of a calibra quantized folder under the model's parameter names (see the module docstring)."""

    def __init__(self, folder: ModelFolder, manifest: dict):
        self.raw = WeightStore(folder)
        self.folder = folder
        self.modules: dict[str, dict] = manifest["modules"]
        experts = sorted(m for m in self.modules if ".experts." in m)
        if experts:
            raise ValueError(
                f"[eval] {folder.path}: quantized experts ({experts[0]}, ...) are stored per expert and filled "
                f"into the model's fused expert tensors; reading them layer by layer is not implemented yet. "
                f"Evaluate this model whole (stream=False / --no-stream)"
            )

    def _quantized(self, name: str) -> str | None:
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        return module if module in self.modules else None

    def __contains__(self, name: str) -> bool:
        return name in self.raw or self._quantized(name) is not None

    def read(self, name: str, count: int | None = None) -> torch.Tensor:
        module = self._quantized(name)
        if module is None:
            return self.raw.read(name, count)
        w = dequantize_module(_Fields(self.raw), module, self.modules[module])
        return w if count is None else w.reshape(-1)[:count]

    @property
    def bytes_read(self) -> int:
        return self.raw.bytes_read


def open_streamed_quantized(folder: ModelFolder, model_config, dtype: torch.dtype) -> StreamedModel:
    """The streamed simulated model of calibra's quantized ``folder`` (weights dequantized as each module loads)."""
    manifest = json.loads((folder.path / MANIFEST).read_text(encoding="utf-8"))
    if "activations" in manifest or "kv_cache" in manifest:  # the layer-by-layer model has no simulation hooks
        raise ValueError(
            f"[eval] {folder.path}: activation / KV-cache quantization is not simulated layer by layer yet; "
            f"evaluate it whole (--no-stream)"
        )
    return StreamedModel(weightless_model(model_config), DequantizedStore(folder, manifest), dtype)


__all__ = ["DequantizedStore", "open_streamed_quantized"]
