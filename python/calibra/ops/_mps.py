"""Metal (MPS) registrations, for Apple Silicon. The Metal backend is built on macOS only; elsewhere
this registers nothing and calibra.build_info() says why."""
import torch

from calibra.ops._registry import register_backend

_mps = getattr(torch.backends, "mps", None)
REGISTERED = register_backend("mps", "MPS") if _mps is not None and _mps.is_available() else []
