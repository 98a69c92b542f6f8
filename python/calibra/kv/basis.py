"""PCA bases for keys and values, per decoder layer and per KV head, from the calibration statistics.

The K/V covariance observer (``calibra.calib.observers.KVCovarianceObserver``) stores, per layer and
KV head, ``sum x x^T`` and ``sum x`` over every unpadded calibration token, in float64. From them:

    mean = sum / n,    C = sum x x^T / n - mean mean^T     (the centered covariance)

and the basis is the eigenvectors of ``C`` sorted by descending eigenvalue. A rank-``r`` cache stores
``c = P_r^T (x - mean)`` (``r`` numbers per head and token) and reads back ``mean + P_r c``.

Why centered: ``mean + P_r P_r^T (x - mean)`` is the best rank-``r`` affine approximation of the
calibration vectors in squared error; the uncentered basis spends one of its ``r`` directions on the
mean whenever the mean is large (value vectors often have one), and the mean costs ``head_dim``
numbers per head and layer once, never per token. At ``r = head_dim`` both are exact.

Keys are observed **before RoPE** (``ModelAdapter.key_value_sources``): RoPE rotates every position by
a different angle, so post-RoPE keys of one head do not share one low-rank subspace, while pre-RoPE
keys do. The cache therefore un-rotates an incoming key, projects it, and re-applies RoPE on read
(``calibra.kv.cache``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from calibra.mps import mps_semantics, on_host

TARGETS = ("v", "kv")


class KVStatsError(ValueError):
    """The statistics lack what a K/V basis needs (no ``kv`` observer, or a layer without tokens)."""


@dataclass
class HeadBases:
    """The PCA of one layer's keys or values, all KV heads at once.

    ``vectors [H, d, d]``: column ``j`` of head ``h`` is its ``j``-th principal direction (descending
    variance); ``values [H, d]``: the variance along each direction (eigenvalues, >= 0);
    ``mean [H, d]``: the calibration mean; ``tokens``: how many tokens the statistics saw.
    """

    vectors: torch.Tensor
    values: torch.Tensor
    mean: torch.Tensor
    tokens: int

    @property
    def num_heads(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.vectors.shape[-1])

    def explained(self, rank: int) -> float:
        """Share of the (centered) variance the top-``rank`` directions keep, averaged over heads."""
        with on_host():  # float64 on the CPU (MPS has none)
            values = self.values.cpu().double()
            total = values.sum(-1).clamp_min(1e-30)
            return float((values[:, :rank].sum(-1) / total).mean())


def pca(outer: torch.Tensor, total: torch.Tensor, n: int) -> HeadBases:
    """Centered PCA from ``outer [H, d, d] = sum x x^T``, ``total [H, d] = sum x`` over ``n`` tokens."""
    if n <= 0:
        raise KVStatsError("[kv] a layer saw no calibration tokens; cannot compute its K/V basis")
    # MPS has neither float64 nor eigh: there the PCA runs on the CPU and the bases go back as float32
    device = outer.device
    host = mps_semantics(device)
    with on_host() if host else contextlib.nullcontext():
        if host:
            outer, total = outer.cpu(), total.cpu()
        outer, total = outer.double(), total.double()
        mean = total / n
        cov = outer / n - mean[:, :, None] * mean[:, None, :]
        cov = (cov + cov.transpose(-1, -2)) / 2  # exact symmetry for eigh
        values, vectors = torch.linalg.eigh(cov)  # ascending
        values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
        vectors, values, mean = vectors.float(), values.float(), mean.float()
    if host:
        vectors, values, mean = vectors.to(device), values.to(device), mean.to(device)
    return HeadBases(vectors=vectors, values=values, mean=mean, tokens=int(n))


def bases_from_stats(stats, layer_keys: list[str], which: str) -> list[HeadBases]:
    """One :class:`HeadBases` per layer (in ``layer_keys`` order) for ``which`` in ``"k"``, ``"v"``."""
    out = []
    for key in layer_keys:
        names = (f"kv/{which}_outer/{key}", f"kv/{which}_sum/{key}")
        missing = [n for n in names if n not in stats.tensors]
        if missing:
            raise KVStatsError(
                f"[kv] the calibration statistics have no {', '.join(missing)}; calibrate with the "
                f"'kv' observer (observers=('kv',))"
            )
        n = int(stats.counts.get(f"kv/{which}/{key}", 0))
        out.append(pca(stats.tensors[names[0]], stats.tensors[names[1]], n))
    return out


def rank_grid(head_dim: int) -> list[int]:
    """The ranks the auto-tuner tries for one layer, descending: d, 3d/4, d/2, 3d/8, d/4, d/8, d/16."""
    fractions = (1, 3 / 4, 1 / 2, 3 / 8, 1 / 4, 1 / 8, 1 / 16)
    ranks = sorted({max(1, int(round(head_dim * f))) for f in fractions}, reverse=True)
    return ranks
