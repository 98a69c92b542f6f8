"""``config.model_type`` -> adapter, and the list of supported architectures (FAULTS row 1)."""

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


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def check_supported(model_type: str | None) -> None:
    """Raise before any weight is loaded when ``model_type`` has no adapter."""
    if model_type not in ADAPTERS:
        raise ValueError(
            f"[models] unsupported architecture model_type={model_type!r}; supported: "
            f"{', '.join(supported_architectures())}. Add an adapter in calibra/models/registry.py"
        )


def get_adapter(model) -> ModelAdapter:
    """The adapter for a loaded model (by ``model.config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    check_supported(model_type)
    return ADAPTERS[model_type](model)
