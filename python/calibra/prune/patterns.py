"""Sparsity patterns: turn a score matrix into a keep-mask with exact counts.

Every pattern works on a score matrix ``scores [out, in]`` (higher = more important) and returns a
bool mask of the same shape, True = keep. Counts are exact, never threshold-based, so ties cannot
change the achieved sparsity, and ties are broken deterministically (unstructured and block: a stable
ascending sort, so among equal scores the lower index is pruned first; N:M: ``nm_mask``'s rule, the
lower index is kept first), so the same input always gives the same mask.

- :class:`Unstructured`: prune ``round(sparsity * count)`` of the lowest scores, where the comparison
  scope is either each output row (``scope="row"``, Wanda's rule: every row loses exactly the same
  number of weights) or the whole layer (``scope="layer"``, the classic magnitude rule).
- :class:`NM`: keep the ``n`` largest of every ``m`` consecutive input channels of each row
  (:func:`calibra.ops.nm_mask`, native). The sparsity is ``1 - n / m`` by construction.
- :class:`Block`: score whole ``rows x cols`` tiles by the sum of their element scores (for
  magnitude with ``w^2`` scores that is the tile's squared Frobenius norm, with ``|w|`` its L1 norm)
  and keep the top tiles -- per layer, or per row of tiles for ``scope="row"``.

``prior`` (a keep-mask) forces weights that are already pruned to stay pruned: their scores become
``-inf`` before the selection. The data-only gradual mode relies on that for nested masks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from calibra.ops import nm_mask

SCOPES = ("row", "layer")
MAX_BLOCK = 1024  # tiles larger than this are whole matrices in disguise; almost certainly a typo


def prune_count(total: int, sparsity: float) -> int:
    """How many of ``total`` weights a sparsity prunes: round half to even, as Python's round()."""
    return int(round(sparsity * total))


def _keep_all_but_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dim of ``scores [R, K]`` pruning exactly the ``k`` lowest per row.

    Ties are ranked by index (what a stable ascending sort gives), so the result does not depend on the
    backend's tie handling (torch.topk's order among ties is unspecified). It is computed without a
    sort: the k-th smallest value t (``kthvalue``, a selection) prunes every score below t and then the
    first ``k - #below`` scores equal to t -- the same set as the stable sort's first k, at topk's cost
    (half the time of the sort at 4096 x 4096)."""
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep
    if scores.device.type == "mps":  # kthvalue is not served by every MPS build: the sort is
        keep.scatter_(-1, torch.sort(scores, dim=-1, stable=True).indices[..., :k], False)
        return keep
    t = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    below = scores < t
    at = scores == t
    need = k - below.sum(-1, keepdim=True)
    return ~(below | (at & (at.cumsum(-1) <= need)))


def _with_prior(scores: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    if prior is None:
        return scores
    return scores.masked_fill(~prior, float("-inf"))


@dataclass(frozen=True)
class Unstructured:
    """Any weight may go; exactly ``round(sparsity * count)`` per scope."""

    name = "unstructured"

    def layer_problem(self, name: str, out_features: int, in_features: int) -> str | None:
        return None

    def fixed_sparsity(self) -> float | None:
        return None

    def mask(
        self, scores: torch.Tensor, sparsity: float, scope: str = "row", prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        s = _with_prior(scores.float(), prior)
        if scope == "row":
            return _keep_all_but_lowest(s, prune_count(s.shape[1], sparsity))
        flat = _keep_all_but_lowest(s.reshape(1, -1), prune_count(s.numel(), sparsity))
        return flat.reshape(s.shape)

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM:
    """N:M semi-structured sparsity along the input dim: ``n`` kept in every ``m`` consecutive channels."""

    n: int
    m: int

    name = "nm"

    def validate(self) -> None:
        for f in ("n", "m"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"[prune] pattern {f} must be an int, got {v!r}")
        if not 2 <= self.m <= 32:
            raise ValueError(f"[prune] N:M needs 2 <= m <= 32, got {self.n}:{self.m}; use 2:4 or 4:8")
        if not 0 < self.n < self.m:
            raise ValueError(f"[prune] N:M needs 0 < n < m, got {self.n}:{self.m}; use 2:4 or 4:8")

    def layer_problem(self, name: str, out_features: int, in_features: int) -> str | None:
        if in_features % self.m:
            return f"{self.n}:{self.m} needs in_features divisible by {self.m}, layer {name} has {in_features}"
        return None

    def fixed_sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def mask(
        self, scores: torch.Tensor, sparsity: float | None = None, scope: str = "row", prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        return nm_mask(_with_prior(scores.float(), prior), self.n, self.m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Block:
    """Whole ``rows x cols`` tiles are kept or pruned, scored by the sum of their element scores."""

    rows: int
    cols: int

    name = "block"

    def validate(self) -> None:
        for f in ("rows", "cols"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_BLOCK:
                raise ValueError(f"[prune] block {f} must be an int in [1, {MAX_BLOCK}], got {v!r}; e.g. block:16x16")
        if self.rows * self.cols < 2:
            raise ValueError("[prune] block size 1x1 is unstructured sparsity; use pattern 'unstructured'")

    def layer_problem(self, name: str, out_features: int, in_features: int) -> str | None:
        if out_features % self.rows or in_features % self.cols:
            return (
                f"block {self.rows}x{self.cols} needs out_features divisible by {self.rows} and in_features by "
                f"{self.cols}, layer {name} is {out_features}x{in_features}"
            )
        return None

    def fixed_sparsity(self) -> float | None:
        return None

    def tile_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """``[out / rows, in / cols]`` sums of the element scores of each tile (fp32 sums of fp32 scores;
        -inf stays -inf, so a tile with a forced-pruned element is pruned first)."""
        o, i = scores.shape
        return scores.float().reshape(o // self.rows, self.rows, i // self.cols, self.cols).sum((1, 3))

    def expand(self, tile_mask: torch.Tensor) -> torch.Tensor:
        return tile_mask.repeat_interleave(self.rows, 0).repeat_interleave(self.cols, 1)

    def mask(
        self, scores: torch.Tensor, sparsity: float, scope: str = "layer", prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        tiles = self.tile_scores(_with_prior(scores.float(), prior))
        keep = Unstructured().mask(tiles, sparsity, scope)
        return self.expand(keep)

    def __str__(self) -> str:
        return f"block:{self.rows}x{self.cols}"


Pattern = Unstructured | NM | Block

_NM_RE = re.compile(r"^(\d+):(\d+)$")
_BLOCK_RE = re.compile(r"^block:(\d+)(?:x(\d+))?$")


def parse_pattern(spec) -> Pattern:
    """A pattern from a spec string (or a pattern object, returned as is).

    Strings: ``"unstructured"``; ``"2:4"``, ``"4:8"`` or any ``"n:m"``; ``"block:16x16"`` (rows x cols of
    the weight ``[out, in]``) or ``"block:16"`` (square). Case and surrounding spaces are ignored.
    """
    if isinstance(spec, (Unstructured, NM, Block)):
        if not isinstance(spec, Unstructured):
            spec.validate()
        return spec
    if not isinstance(spec, str):
        raise ValueError(
            f"[prune] pattern must be a string such as 'unstructured', '2:4', '4:8' or 'block:16x16', got {spec!r}"
        )
    s = spec.strip().lower()
    if s == "unstructured":
        return Unstructured()
    if mt := _NM_RE.match(s):
        p = NM(int(mt.group(1)), int(mt.group(2)))
        p.validate()
        return p
    if mt := _BLOCK_RE.match(s):
        r = int(mt.group(1))
        p = Block(r, int(mt.group(2)) if mt.group(2) else r)
        p.validate()
        return p
    raise ValueError(
        f"[prune] unknown pattern {spec!r}; use 'unstructured', 'n:m' (e.g. '2:4', '4:8') or "
        f"'block:RxC' (e.g. 'block:16x16')"
    )


def achieved_sparsity(keep: torch.Tensor) -> float:
    """Fraction of pruned (False) entries of a keep-mask."""
    return 1.0 - float(keep.sum()) / max(1, keep.numel())
