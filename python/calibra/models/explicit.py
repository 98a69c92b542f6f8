"""The families with an explicit adapter (``config.model_type`` -> adapter class).

A leaf of ``calibra.models``: the registry, the refusals and the structural adapter all read this table,
so it sits below them (imports flow one way: explicit <- refusals / structural <- registry).
"""

from __future__ import annotations

from calibra.models.adapter import ModelAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llama": ModelAdapter,
    "mistral": ModelAdapter,
    "qwen2": ModelAdapter,
    "qwen3": ModelAdapter,
    "mixtral": ModelAdapter,
    "qwen2_moe": ModelAdapter,
    "qwen3_moe": ModelAdapter,
}
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")

__all__ = ["ADAPTERS", "MOE_TYPES"]
