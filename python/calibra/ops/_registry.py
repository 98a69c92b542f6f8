"""The one op registry: every kernel-level op of calibra is a ``torch.library`` op ``calibra::NAME``.

An op is defined once, by its family module (``calibra/ops/<family>.py``), with :func:`define`:

- ``schema``: the torch schema (no kwarg-only arguments; the public wrapper takes keywords);
- ``check(*args)``: validation that reads only shapes, dtypes and scalar arguments, so it also runs
  on fake tensors; it raises ``ValueError``/``TypeError`` whose message starts with ``[op]``;
- ``alloc(*args)``: the shape function. It returns the op's (empty) output tensors on the inputs'
  device. It serves as the fake implementation and allocates the outputs a native kernel fills, so
  output shapes and dtypes are written exactly once;
- ``ref(*args)``: the pure-torch reference, registered as the default implementation
  (``CompositeExplicitAutograd``) and used by the tests as the oracle.

Native kernels are registered per backend by :func:`register_backend` (called from ``_cpu.py``,
``_cuda.py``, ``_mps.py``). The adapter is generic: it validates, allocates the outputs with
``alloc``, and calls ``module.NAME(*args, *outputs[, stream])`` with every tensor passed as a
TensorArg tuple (see ``calibra._native.tensor_arg``) in schema order, then the outputs (the Metal
backend alone takes the torch tensors themselves, see :func:`_mps_call`). So a native
entry point for ``hadamard(Tensor x, int block_size) -> Tensor`` is
``hadamard(x: TensorArg, block_size: int, out: TensorArg)`` on CPU, plus ``stream: int`` on CUDA.

Every implementation records itself in the active :func:`trace`, so tests can assert that the native
kernel, not the reference, served a call.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from calibra import _native

NAMESPACE = "calibra"
LIB = torch.library.Library(NAMESPACE, "DEF")
_IMPL_LIBS: list[torch.library.Library] = []  # keep registrations alive


@dataclass(frozen=True)
class OpDef:
    name: str
    schema: str
    check: Callable
    alloc: Callable
    ref: Callable
    # Make tensor inputs contiguous before calling a native kernel (for kernels that need it).
    native_contiguous: bool = False
    # example(device) -> args: a small valid call, used by `calibra selftest`.
    example: Callable | None = None
    # workspace(backend, *args) -> list of scratch tensors a native kernel needs (e.g. split-K partial
    # sums), allocated here so native code never allocates; passed right after the outputs.
    workspace: Callable | None = None


OPS: dict[str, OpDef] = {}

# CUDA kernels cannot raise, and they may not allocate. An op whose CUDA kernel must reject bad
# *data* (a NaN, a code out of range) declares a handler with @cuda_data_error: the adapter then
# passes one more tensor, an int64 [1] flag holding NO_DATA_ERROR, right after the outputs; the
# kernel lowers it (atomicMin) to the row-major index of the first bad item, and after the call the
# adapter reads it back (one 8-byte copy, which synchronizes the stream) and calls the handler,
# which raises the same ValueError as the CPU kernel and the reference.
NO_DATA_ERROR = 2**63 - 1
_CUDA_DATA_ERRORS: dict[str, Callable] = {}


def raise_data_error(name: str, index: int, args: tuple) -> None:
    """Raise op ``name``'s error for the item a native kernel flagged at ``index``: the op's handler
    names it; a handler that finds nothing to name falls through to a generic message."""
    _CUDA_DATA_ERRORS[name](index, *args)
    raise ValueError(f"[{name}] the CUDA kernel flagged bad data at index {index}")


def cuda_data_error(name: str) -> Callable:
    """Decorator: ``handler(index, *op_args)`` raises the op's error for the flagged item."""

    def register(handler: Callable) -> Callable:
        _CUDA_DATA_ERRORS[name] = handler
        return handler

    return register


# ---------------------------------------------------------------------------------------------
# trace: which implementation served each call


class Trace:
    """Calls recorded while a :func:`trace` block is active, as ``(op, impl)`` pairs."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def impls(self, op: str) -> set[str]:
        """The implementations ("ref", "cpu", "cuda", "mps") that served ``op``."""
        return {impl for name, impl in self.calls if name == op}

    def __repr__(self) -> str:
        return f"Trace({self.calls!r})"


_local = threading.local()


@contextlib.contextmanager
def trace():
    """Record which implementation serves each calibra op called inside the block.

    >>> with calibra.ops.trace() as t:
    ...     calibra.ops.hadamard(x)
    >>> t.impls("hadamard")
    {'cpu'}
    """
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    t = Trace()
    stack.append(t)
    try:
        yield t
    finally:
        stack.remove(t)


def _record(op: str, impl: str) -> None:
    for t in getattr(_local, "stack", ()):
        t.calls.append((op, impl))


# ---------------------------------------------------------------------------------------------
# definition


def define(
    name: str,
    schema: str,
    *,
    check: Callable,
    alloc: Callable,
    ref: Callable,
    native_contiguous: bool = False,
    example: Callable | None = None,
    workspace: Callable | None = None,
) -> OpDef:
    """Define ``calibra::name`` with its schema, checks, shape function and reference."""
    if name in OPS:
        raise RuntimeError(f"[registry] op {name} defined twice")
    op = OpDef(name, schema, check, alloc, ref, native_contiguous, example, workspace)
    LIB.define(name + schema)

    def reference_impl(*args):
        check(*args)
        _record(name, "ref")
        return ref(*args)

    def fake_impl(*args):
        check(*args)
        return alloc(*args)

    LIB.impl(name, reference_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake_impl, lib=LIB)
    OPS[name] = op
    return op


def _outputs_as_list(outs) -> list:
    if outs is None:
        return []
    if isinstance(outs, (tuple, list)):
        return list(outs)
    return [outs]


def _to_native(a):
    """Tensors cross as TensorArg tuples, dtypes as their dtype codes, the rest (None for an absent
    optional tensor included) as is."""
    if isinstance(a, torch.Tensor):
        return _native.tensor_arg(a)
    if isinstance(a, torch.dtype):
        return _native.DTYPE_CODES[a]
    return a


def _native_impl(op: OpDef, module, backend: str) -> Callable:
    fn = getattr(module, op.name)

    def native_impl(*args):
        op.check(*args)
        if op.native_contiguous:
            args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        outs = op.alloc(*args)
        if backend == "mps":
            return _mps_call(op, fn, args, outs)
        native_args = [_to_native(a) for a in args]
        native_args += [_native.tensor_arg(o) for o in _outputs_as_list(outs)]
        if op.workspace is not None:
            native_args += [None if w is None else _native.tensor_arg(w) for w in op.workspace(backend, *args)]
        if backend != "cuda":
            fn(*native_args)
            _record(op.name, backend)
            return outs
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        on_error = _CUDA_DATA_ERRORS.get(op.name)
        flag = None
        if on_error is not None:
            flag = torch.full((1,), NO_DATA_ERROR, dtype=torch.int64, device=device)
            native_args.append(_native.tensor_arg(flag))
        with torch.cuda.device(device):
            fn(*native_args, torch.cuda.current_stream(device).cuda_stream)
        _record(op.name, backend)
        if flag is not None:
            bad = int(flag.item())
            if bad != NO_DATA_ERROR:
                raise_data_error(op.name, bad, args)
        return outs

    native_impl.__name__ = f"{op.name}_{backend}"
    return native_impl


# Metal kernels cannot raise either; an op whose kernel must reject bad data registers a host-side
# check (calibra/ops/_mps.py) that runs before the launch.
MPS_DATA_CHECKS: dict[str, Callable] = {}
_MPS_WARNED: set[str] = set()


def _mps_call(op: OpDef, fn: Callable, args: tuple, outs):
    """The Metal backend takes torch tensors (MPS tensors), not TensorArg tuples: its kernels are
    launched through torch's own MPS stream (see calibra._metal). A case its kernels do not cover
    (float64, a Hadamard block > 4096) comes back as UNSUPPORTED and runs in the reference."""
    from calibra._metal import UNSUPPORTED

    data_check = MPS_DATA_CHECKS.get(op.name)
    if data_check is not None:
        data_check(*args)
    result = fn(*args, *_outputs_as_list(outs))
    if result is UNSUPPORTED:
        # Visible, never silent: the trace says "ref", and the first time per op a warning says why.
        if op.name not in _MPS_WARNED:
            _MPS_WARNED.add(op.name)
            warnings.warn(
                f"[{op.name}] the Metal kernel does not cover this case (e.g. float64 or a very "
                "large block); it ran in the pure-torch reference",
                RuntimeWarning,
                stacklevel=3,
            )
        _record(op.name, "ref")
        return op.ref(*args)
    _record(op.name, "mps")
    return outs


def register_backend(backend: str, dispatch_key: str) -> list[str]:
    """Register every op that ``calibra._<backend>`` implements for ``dispatch_key``.

    Returns the names of the ops registered (empty when the module did not load; the reason is in
    :func:`calibra.build_info`).
    """
    module = _native.load(backend)
    if module is None:
        return []
    lib = torch.library.Library(NAMESPACE, "IMPL")
    _IMPL_LIBS.append(lib)
    registered = []
    for op in OPS.values():
        if hasattr(module, op.name):
            lib.impl(op.name, _native_impl(op, module, backend), dispatch_key)
            registered.append(op.name)
    return registered


def native_ops(backend: str) -> set[str]:
    """Names of the ops the ``backend`` module implements (empty if it is not loaded)."""
    module = _native.load(backend)
    if module is None:
        return set()
    return {name for name in OPS if hasattr(module, name)}
