"""calibra::hessian_accumulate -- the layer-input Hessian of GPTQ-style calibration, H += X^T X."""

from __future__ import annotations

import torch

from calibra.ops import _ref
from calibra.ops._checks import check_floating, check_rank, check_same_device, check_tensor
from calibra.ops._registry import define

_OP = "hessian_accumulate"
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_H_DTYPES = (torch.float32, torch.float64)


def _check(H: torch.Tensor, x: torch.Tensor) -> None:
    check_tensor(_OP, "H", H)
    check_rank(_OP, "x", x, min_rank=1)
    check_same_device(_OP, H=H, x=x)
    check_floating(_OP, "H", H, _H_DTYPES)
    check_floating(_OP, "x", x, _X_DTYPES)
    d = x.shape[-1]
    if H.dim() != 2 or H.shape[0] != d or H.shape[1] != d:
        got = ", ".join(str(s) for s in H.shape)
        raise ValueError(f"[{_OP}] H must be [d, d] with d = x.shape[-1] = {d}, got [{got}]")
    if not H.is_contiguous():
        raise ValueError(f"[{_OP}] H must be contiguous, got strides {tuple(H.stride())}")


def _alloc(H: torch.Tensor, x: torch.Tensor) -> None:
    return None  # in place: no outputs


define(
    f"{_OP}",
    "(Tensor(a!) H, Tensor x) -> ()",
    check=_check,
    alloc=_alloc,
    ref=_ref.hessian_accumulate,
    example=lambda device: (torch.zeros(64, 64, device=device), torch.randn(2, 5, 64, device=device)),
)


def hessian_accumulate(H: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Accumulate the Hessian of a linear layer's inputs in place: ``H += X^T X``.

    Args:
        H: ``[d, d]`` float32 or float64, contiguous, symmetric. Updated in place. Only its lower
            triangle is read; on return H is exactly symmetric (the lower triangle is computed and
            mirrored).
        x: ``[..., d]`` float32, float16, bfloat16 or float64, any strides; its leading dims are
            flattened into ``N`` rows, ``X = x.reshape(-1, d)``. ``N = 0`` is a no-op.

    Returns:
        ``H`` (the same tensor).

    Products and sums are in H's dtype (fp16/bf16 x converts to fp32 exactly; float64 H gives a
    fully fp64 accumulation). NaN/Inf in ``x`` are not checked and propagate into ``H``: the
    calibration engine checks activations before they reach a Hessian.
    """
    torch.ops.calibra.hessian_accumulate(H, x)
    return H
