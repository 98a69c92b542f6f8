"""The MPS guard: run a job on the CPU while refusing what PyTorch's MPS backend cannot do.

Inside :func:`mps_guard`, every aten op the job runs is checked by a ``TorchDispatchMode``:

- a float64 tensor among its inputs or outputs raises :class:`MpsLimitError` (MPS has no float64);
- an op PyTorch's MPS backend has no kernel for (:data:`calibra.mps.unsupported_ops.UNSUPPORTED_OPS`)
  raises too;
- steps written inside :func:`calibra.mps.on_host` are not checked: on a Mac they run on the CPU.

and :func:`calibra.mps.mps_semantics` is true, so the job takes its MPS path (the host steps, float32 where the
CPU path uses float64). calibra's own ops (``torch.ops.calibra.*``) are checked as MPS serves them: the ops
the Metal backend implements run their kernel (here the CPU kernel; the Metal kernels themselves are proven
by the CPU harness of tests/metal), the others run their pure-torch reference, whose aten ops are checked.

What the guard cannot see: a tensor a job forgot to move (on the CPU everything is on one device), and
dtype limits of single MPS kernels other than float64 (e.g. int64 reductions on old macOS).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from calibra import mps
from calibra.mps.unsupported_ops import UNSUPPORTED_OPS


class MpsLimitError(RuntimeError):
    """A job used something PyTorch's MPS backend does not have."""


def _metal_ops() -> frozenset[str]:
    from calibra._metal import Backend

    return frozenset(n for n in dir(Backend) if not n.startswith("_"))


# aten ops that only describe tensors (no kernel runs): a float64 tensor may pass through them inside a host step
_NO_KERNEL = {"detach.default", "_local_scalar_dense.default"}


class MpsGuardMode(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.metal = _metal_ops()
        self.checked = 0  # aten ops checked (the lane asserts the guard saw the job)
        self.calibra_ops: dict[str, str] = {}  # op -> "metal" or "ref", how the guard served it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        name = f"{func._schema.name.split('::', 1)[1]}.{func._overloadname}"
        if ns == "calibra" and not mps.in_host_step():
            return self._calibra(func, name.split(".")[0], args, kwargs)
        out = func(*args, **kwargs)
        if ns == "aten" and not mps.in_host_step():
            self.checked += 1
            if name in UNSUPPORTED_OPS:
                raise MpsLimitError(f"[mps] aten.{name} has no MPS kernel (calibra/mps/unsupported_ops.py)")
            if name not in _NO_KERNEL:
                for t in tree_flatten((args, kwargs, out))[0]:
                    if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                        raise MpsLimitError(f"[mps] aten.{name} on a float64 tensor (MPS has no float64)")
        return out

    def _calibra(self, func, op: str, args, kwargs):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise MpsLimitError(f"[mps] calibra.{op} on a float64 tensor (MPS has no float64)")
        if op in self.metal:
            self.calibra_ops[op] = "metal"
            with torch.utils._python_dispatch._disable_current_modes():
                return func(*args, **kwargs)
        # no Metal kernel: on MPS the op's reference runs on the device, so its aten ops are checked
        from calibra.ops._registry import OPS

        self.calibra_ops[op] = "ref"
        OPS[op].check(*args, **kwargs)
        return OPS[op].ref(*args, **kwargs)


@contextlib.contextmanager
def mps_guard():
    """Run the block with MPS semantics on the CPU, refusing float64 and ops MPS lacks (see the module doc)."""
    mode = MpsGuardMode()
    with mps.emulate(), mode:
        yield mode


__all__ = ["MpsGuardMode", "MpsLimitError", "mps_guard"]
