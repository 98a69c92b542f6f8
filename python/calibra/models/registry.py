"""``config.model_type`` -> adapter (FAULTS row 1).

Explicit adapters (``ADAPTERS``) stay where a family's semantics are needed: the Llama/Mistral/Qwen
layout's roles by name (true-sequential groups, SmoothQuant's norms, the attention block to freeze), the
K/V sources for KV-cache calibration, and the MoE blocks' routing (per-expert statistics and coverage).
Every other causal-LM type of the installed transformers gets the structural adapter
(``structural.StructuralAdapter``), unless ``refusals.py`` refuses it with a reason.
"""

from __future__ import annotations

from calibra.models.adapter import ModelAdapter
from calibra.models.explicit import ADAPTERS


def supported_architectures() -> list[str]:
    """The families with an explicit adapter (every other accepted family is discovered structurally)."""
    return sorted(ADAPTERS)


def _config_dict(config) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    return config.to_dict() if hasattr(config, "to_dict") else None


def check_supported(model_type: str | None, config=None) -> None:
    """Raise before any weight is loaded when ``model_type`` is refused (``refusals.py``)."""
    from calibra.models.refusals import refusal

    reason = refusal(model_type, _config_dict(config))
    if reason is not None:
        raise ValueError(
            f"[models] unsupported architecture model_type={model_type!r}: {reason}. calibra compresses "
            f"decoder-only causal LMs (explicit adapters: {', '.join(supported_architectures())}; every other "
            f"causal-LM type of transformers by structure, see docs/model_matrix.md)"
        )


def get_adapter(model) -> ModelAdapter:
    """The adapter for a loaded (or weightless) model: explicit by ``model.config.model_type``, else
    structural (which raises when it finds no decoder layer stack)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    check_supported(model_type, config)
    if model_type in ADAPTERS:
        return ADAPTERS[model_type](model)
    from calibra.models.structural import StructuralAdapter

    return StructuralAdapter(model)
