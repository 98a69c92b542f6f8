"""calibra: calibration-driven compression for large language models.

Public surface (kept small on purpose): :mod:`calibra.ops` (kernel-level ops with native CPU/CUDA
implementations and pure-torch references) and :func:`build_info`.
"""
__version__ = "0.1.0"

from calibra._native import build_info  # noqa: E402
from calibra import ops  # noqa: E402

__all__ = ["__version__", "build_info", "ops"]
