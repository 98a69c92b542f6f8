"""CPU registrations: every op that calibra._cpu implements serves CPU tensors."""

import warnings

from calibra import _native
from calibra.ops._registry import register_backend

REGISTERED = register_backend("cpu", "CPU")

if not REGISTERED and "CALIBRA_DISABLE_NATIVE" not in _native.load_failure("cpu"):
    warnings.warn(  # noqa: B028 - stacklevel 1: the warning is about this module's import, not its importer
        f"calibra: the native CPU kernels did not load ({_native.load_failure('cpu')}); "
        "every op runs in its pure-torch reference (slow). See `calibra info`.",
        RuntimeWarning,
    )
