"""CUDA registrations. calibra._cuda is imported only when torch sees a CUDA device, so a CPU-only
user never loads anything that needs the CUDA runtime.

On a machine with a GPU but no calibra._cuda (a plain ``pip install .``), every op on CUDA tensors would
run in its pure-torch reference; :func:`register` then warns once (RuntimeWarning) and names the missing
backend, and ``calibra info`` gives the reason."""

import warnings

import torch

from calibra import _native
from calibra.ops._registry import register_backend

BUILD_HINT = "build it with CALIBRA_CUDA=1 pip install . (or tools/dev_build.sh -DCALIBRA_CUDA=ON)"
_warned = False


def warn_missing() -> None:
    """Warn (once per process) that torch sees a GPU but calibra's CUDA kernels did not load."""
    global _warned
    reason = _native.load_failure("cuda")
    if _warned or "CALIBRA_DISABLE_NATIVE" in reason:  # disabled on purpose: nothing to warn about
        return
    _warned = True
    warnings.warn(  # noqa: B028 - stacklevel 1: the warning is about this module's import, not its importer
        f"calibra: torch sees a CUDA device but calibra's CUDA backend (calibra._cuda) did not load "
        f"({reason or 'unknown reason'}); every op on CUDA tensors runs in its pure-torch reference (slow). "
        f"To get the native kernels, {BUILD_HINT}. See `calibra info`.",
        RuntimeWarning,
    )


def register() -> list[str]:
    """Register the CUDA kernels when torch sees a GPU; warn once when it does but they did not load."""
    if not torch.cuda.is_available():
        return []
    registered = register_backend("cuda", "CUDA")
    if not registered:
        warn_missing()
    return registered


REGISTERED = register()
