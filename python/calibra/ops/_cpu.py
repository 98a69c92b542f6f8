"""CPU registrations: every op that calibra._cpu implements serves CPU tensors."""
from calibra.ops._registry import register_backend

REGISTERED = register_backend("cpu", "CPU")
