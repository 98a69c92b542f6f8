"""CUDA registrations. calibra._cuda is imported only when torch sees a CUDA device, so a CPU-only
user never loads anything that needs the CUDA runtime."""

import torch

from calibra.ops._registry import register_backend

REGISTERED = register_backend("cuda", "CUDA") if torch.cuda.is_available() else []
