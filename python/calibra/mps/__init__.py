"""What calibra does differently on Apple's MPS device, in one place.

MPS has no float64 and lacks some aten ops (:mod:`calibra.mps.unsupported_ops`). Where a job needs one of
them, the MPS path runs that step on the CPU: the step is written inside :func:`on_host`, its inputs moved
with ``.cpu()`` and its result converted (to float32) and moved back before the block ends. On Apple Silicon
host and device share one memory, so such a step costs a copy, not a bus transfer.

:func:`mps_semantics` says whether a device gets the MPS path: an ``mps`` device, or any device while the
MPS guard (:mod:`calibra.mps.guard`, the Linux CI lane) emulates one. This package imports only torch
(everything in calibra may import it).
"""

from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


def _depth(name: str) -> int:
    return getattr(_state, name, 0)


def mps_semantics(device) -> bool:
    """True when work on ``device`` must stay within MPS's limits."""
    if _depth("emulate"):
        return True
    return device is not None and torch.device(device).type == "mps"


def in_host_step() -> bool:
    """True inside an :func:`on_host` block (the guard does not check there)."""
    return _depth("host") > 0


@contextlib.contextmanager
def on_host():
    """A step that runs on the CPU on a Mac (float64, or an op MPS lacks). The block must move its device
    inputs with ``.cpu()`` and hand back only tensors MPS can hold (float32, moved back to the device)."""
    _state.host = _depth("host") + 1
    try:
        yield
    finally:
        _state.host -= 1


@contextlib.contextmanager
def emulate():
    """Make :func:`mps_semantics` true for every device (used by the MPS guard)."""
    _state.emulate = _depth("emulate") + 1
    try:
        yield
    finally:
        _state.emulate -= 1


__all__ = ["mps_semantics", "on_host", "in_host_step", "emulate"]
