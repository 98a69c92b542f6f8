"""Argument checks shared by the op families. Each raises with the ``[op]`` prefix and names the
argument, what was expected and what came. They read only shapes, dtypes and Python scalars, so they
run on fake tensors too."""

from __future__ import annotations

import torch


def check_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"[{op}] {name} must be a torch.Tensor, got {type(t).__name__}")


def check_rank(op: str, name: str, t: torch.Tensor, *, rank: int | None = None, min_rank: int | None = None) -> None:
    check_tensor(op, name, t)
    if rank is not None and t.dim() != rank:
        raise ValueError(f"[{op}] {name} must be {rank}-D, got shape {tuple(t.shape)}")
    if min_rank is not None and t.dim() < min_rank:
        raise ValueError(f"[{op}] {name} must have at least {min_rank} dims, got shape {tuple(t.shape)}")


def check_floating(op: str, name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"[{op}] {name} must be one of {names}, got {str(t.dtype).replace('torch.', '')}")


def check_dtype(op: str, name: str, t: torch.Tensor, allowed) -> None:
    check_floating(op, name, t, allowed if isinstance(allowed, (tuple, list, set)) else (allowed,))


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"[{op}] all tensors must be on one device, got {listing}")


def check_range(op: str, name: str, value: int, lo: int, hi: int) -> None:
    if not (lo <= value <= hi):
        raise ValueError(f"[{op}] {name} must be in [{lo}, {hi}], got {value}")
