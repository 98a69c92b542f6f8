"""Reference for calibra::hadamard: the butterfly network written in plain torch, in fp32 (fp64 for
float64 input). The native kernels run the same butterflies in the same order."""

import math

import torch


def hadamard(x: torch.Tensor, block_size: int) -> torch.Tensor:
    n = x.shape[-1]
    b = n if block_size == -1 else block_size
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(compute).reshape(-1, n // b, b)
    h = 1
    while h < b:
        y = y.reshape(y.shape[0], n // b, b // (2 * h), 2, h)
        lo, hi = y[..., 0, :], y[..., 1, :]
        y = torch.stack((lo + hi, lo - hi), dim=-2)
        h *= 2
    scale = torch.tensor(1.0 / math.sqrt(b), dtype=compute)
    return (y.reshape(x.shape) * scale).to(x.dtype)
