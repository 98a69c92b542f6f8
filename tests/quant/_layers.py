"""Layers with known Hessians for the solver tests."""

import torch


def layer(out=48, n=128, tokens=1024, seed=0, outliers=False):
    """(W, H = X^T X, tokens) with correlated activations X (and a few outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * 0.3 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix
    if outliers:
        x[:, torch.randperm(n, generator=g)[:4]] *= 25.0
    w = torch.randn(out, n, generator=g) * 0.05
    return w, x.T @ x, tokens, x


def proxy_error(w, q, h):
    """tr((W - Q) H (W - Q)^T), the GPTQ objective, in fp64."""
    d = w.double() - q.double()
    return float(torch.trace(d @ h.double() @ d.T))
