"""QuantizedModel: what ``calibra.quantize`` returns and what the exporters read.

The contract between quantization (which fills it) and export (which writes it in an engine's format):

- ``model`` is calibra's *simulated* quantized model: the original Hugging Face model object with every
  quantized weight replaced by its effective dense weight (``QuantizedLayer.dense()``), so evaluating
  ``model`` measures exactly what the quantized checkpoint computes (MR-GPTQ rotations included).
- ``layers`` maps each quantized weight to its :class:`~calibra.quant.result.QuantizedLayer` (codes,
  scales, zeros, g_idx, global scale, rotation). Keys are module paths as ``model.named_modules()``
  gives them (``model.layers.0.self_attn.q_proj``); a fused-expert weight slice is keyed
  ``<moe block>.experts.<e>.gate_up_proj`` / ``.down_proj`` (the calibration engine's names for expert
  statistics), with ``weight [out, in]`` the expert's 2-D slice.
- Everything else in ``model`` (embeddings, norms, lm_head unless quantized, router) is left dense.
- ``input_quant`` (activation-quantized schemes, ``calibra.quant.scheme``): module path -> how its input
  is quantized (``calibra.quant.activations.InputQuant``); ``kv_scales``: decoder layer index ->
  ``(k_scale, v_scale)`` of an FP8 KV cache (``calibra.quant.kv_fp8``). ``model`` carries the hooks that
  simulate both, so evaluating it measures the deployed model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from calibra.quant.result import QuantizedLayer


@dataclass
class QuantizedModel:
    model: Any
    """The transformers model with quantized weights replaced by their dense effective weights."""
    tokenizer: Any
    """The model's tokenizer (exports copy its files), or None."""
    layers: dict[str, QuantizedLayer]
    """Module path -> quantized weight (see the module docstring for expert naming)."""
    config: Any
    """The RTNConfig / GPTQConfig / MRGPTQConfig used."""
    source: str
    """Where the model came from: ``builtin:NAME`` or a local folder path."""
    report: dict = field(default_factory=dict)
    """Settings, versions, timings, per-module log and evaluation (the content of report.json)."""
    scheme: str | None = None
    """The activation-quantized scheme (``fp8``, ``fp8-dynamic``), or None for weight-only."""
    input_quant: dict[str, Any] | None = None
    """Module path -> ``InputQuant`` (activation-quantized schemes), or None."""
    kv_scales: dict[int, Any] | None = None
    """Layer index -> ``(k_scale, v_scale)`` tensors ``[1]`` (``--kv-cache fp8``), or None."""
