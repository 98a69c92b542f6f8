"""Shared by the optional real-client tests (tools/client_lane.sh runs each with its client's venv)."""

from __future__ import annotations

import torch

from tests.export import _qmodel as Q


def model_and_tokenizer(**kw):
    """builtin:tiny-llama when installed (float32), else the random tiny Llama with the test tokenizer."""
    got = Q.builtin_llama() if not kw else None
    if got is not None:
        return got[0], got[1], "builtin:tiny-llama"
    return Q.tiny_llama(**kw), Q.tokenizer(), "test:tiny-llama"


def report(client: str, case: str, diff: float, tol: float, extra: str = "") -> None:
    """One summary line per case; the lane script collects the lines that start with CLIENT."""
    print(
        f"\nCLIENT {client:24s} {case:28s} max|dlogits|={diff:.3e} tol={tol:g} "
        f"{'PASS' if diff <= tol else 'FAIL'} {extra}".rstrip()
    )


def max_diff(a, b) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())
