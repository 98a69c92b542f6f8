"""Linear-like modules: ``nn.Linear`` and transformers' GPT-2 ``Conv1D``.

``Conv1D`` (GPT-2, OpenAI-GPT, GPT-SW3) computes ``x @ W + b`` with its weight stored **transposed**,
``[in, out]``. Everything that reads or writes a weight as ``[out, in]`` (the solvers, the saved folder)
goes through :func:`weight_view` / :func:`store_weight`, so a Conv1D is quantized along its input
dimension exactly like a Linear. The class is recognised by name and attributes (``nf``/``nx``), so
this module imports nothing from transformers.
"""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``pytorch_utils.Conv1D`` (weight ``[in, out]``)."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "nx")


def is_linear_like(mod: nn.Module) -> bool:
    """A 2-D matmul module calibra can quantize: ``nn.Linear`` (and subclasses) or a ``Conv1D``."""
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


def in_out(mod: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module."""
    if is_conv1d(mod):
        return int(mod.weight.shape[0]), int(mod.weight.shape[1])
    return int(mod.in_features), int(mod.out_features)


def weight_view(mod: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a transposed view for a Conv1D; no copy)."""
    w = mod.weight.data
    return w.t() if is_conv1d(mod) else w


def store_weight(mod: nn.Module, w: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight back into the module in place (transposed for a Conv1D)."""
    weight_view(mod).copy_(w)


__all__ = ["is_conv1d", "is_linear_like", "in_out", "weight_view", "store_weight"]
