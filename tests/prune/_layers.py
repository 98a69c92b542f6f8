"""Small synthetic layers for the pruning tests: correlated inputs with a few outlier channels, the
regime LLM activations are in (and where the three methods differ)."""

from __future__ import annotations

import torch

OUTLIERS = (5, 77, 130, 203)


def correlated_inputs(tokens: int, width: int, seed: int, outlier_scale: float = 12.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rank = max(4, width // 8)
    mix = torch.randn(rank, width, generator=g) / rank**0.5
    x = torch.randn(tokens, rank, generator=g) @ mix * 2.0 + 0.3 * torch.randn(tokens, width, generator=g)
    for c in OUTLIERS:
        if c < width:
            x[:, c] *= outlier_scale
    return x


def layer(out: int, width: int, seed: int, tokens: int = 1024):
    """(w [out, width], x [tokens, width]) with a seeded generator."""
    g = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(out, width, generator=g) / width**0.5
    return w, correlated_inputs(tokens, width, seed)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    """||(W - W_hat) X^T||_F computed directly from X (not from the Hessian)."""
    return float(torch.linalg.norm((w.double() - w_hat.double()) @ x.double().T))
