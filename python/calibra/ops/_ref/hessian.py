"""Reference for calibra::hessian_accumulate: X^T X in fp64, added to H and rounded once to H's dtype.
Clear, not fast; the test oracle."""

import torch


def hessian_accumulate(H: torch.Tensor, x: torch.Tensor) -> None:
    d = x.shape[-1]
    X = x.reshape(-1, d).double()
    if X.shape[0] == 0:
        return None
    H.copy_(H.double() + X.T @ X)
    return None
