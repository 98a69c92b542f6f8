"""The per-device test table shared by every op test (tests/ops/test_<family>.py).

- ``DEVICES``: every device the ops are tested on. CPU always; CUDA and MPS when torch sees one (the
  test then also requires calibra's native backend for it to be built: a GPU machine whose CUDA module
  did not load fails loudly instead of quietly testing the reference against itself).
- ``run_native(op, fn, device)``: calls ``fn()`` inside a trace and asserts the native kernel of
  ``device`` served ``op``.
- ``assert_close_2x``: the float rule: |ours - exact| <= 2 * |torch_lowp - exact| + atol elementwise,
  where ``exact`` is the reference in fp64 and ``torch_lowp`` the same reference run in the low
  precision the kernel works in.
"""

from __future__ import annotations

import pytest
import torch

import calibra
from calibra import _native

_CANDIDATES = [
    ("cpu", True),
    ("cuda", torch.cuda.is_available()),
    ("mps", getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()),
]

DEVICES = [
    pytest.param(name, marks=() if present else pytest.mark.skip(reason=f"no {name} device here"), id=name)
    for name, present in _CANDIDATES
]


def require_native(device: str) -> None:
    """Fail (not skip) when the device exists but calibra's native backend for it did not load."""
    if _native.load(device) is None:
        info = calibra.build_info()["backends"][device]
        pytest.fail(f"calibra's {device} backend did not load: {info.get('reason')}")


def run_native(op: str, fn, device: str):
    """Run ``fn()`` and assert that the native ``device`` kernel (not the reference) served ``op``."""
    require_native(device)
    with calibra.ops.trace() as t:
        result = fn()
    impls = t.impls(op)
    assert impls == {device}, f"{op} on {device} was served by {impls or 'nothing'}, expected the native kernel"
    return result


def assert_close_2x(ours: torch.Tensor, exact: torch.Tensor, lowp: torch.Tensor, atol: float, what: str = "") -> None:
    """Elementwise |ours - exact| <= 2 |lowp - exact| + atol (the flash-attention test rule)."""
    ours64, exact64, lowp64 = (t.detach().double().cpu() for t in (ours, exact, lowp))
    err = (ours64 - exact64).abs()
    budget = 2 * (lowp64 - exact64).abs() + atol
    bad = err > budget
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements exceed 2x torch's low-precision error + {atol}; "
            f"first at {i}: ours {ours64[tuple(i)].item()!r}, exact {exact64[tuple(i)].item()!r}, "
            f"torch low-precision {lowp64[tuple(i)].item()!r}"
        )


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout (every other element of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous() or t.numel() <= 1
    return out
