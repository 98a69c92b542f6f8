"""Architecture adapters (layer lists, attention/MLP/expert discovery, fused experts)."""

from calibra.models.adapter import ModelAdapter, MoEBlock
from calibra.models.explicit import ADAPTERS, MOE_TYPES
from calibra.models.refusals import refusal
from calibra.models.registry import check_supported, get_adapter, supported_architectures

__all__ = [
    "ModelAdapter",
    "MoEBlock",
    "ADAPTERS",
    "MOE_TYPES",
    "check_supported",
    "get_adapter",
    "supported_architectures",
    "refusal",
]
