"""Statistics combined across the ranks of a ``torch.distributed`` job (data parallelism).

Each rank runs the calibration samples of its own shard through the layer; before any solver reads a
layer's statistics they are combined across ranks in place, so every rank holds the statistics of the
whole calibration set: sums (Hessians, channel norms, K/V covariances, histograms, MoE token counts and
probability mass) are summed, range minima and maxima take the minimum and maximum, and counts are
summed as Python integers (exact).

Every rank must issue the same collectives in the same order, whatever its shard saw: an expert that no
token of one rank reached has no statistics there. So the ranks first exchange the names, shapes and
dtypes they hold (``all_gather_object``), create what they lack (zeros; +inf / -inf for min / max), and
reduce the union in sorted order. Modules that read one input share one Hessian tensor on a rank (q/k/v,
gate/up: ``HessianObserver.linear_shared``); their sums are equal on every rank, so only one name of each
shared group is reduced and the others point at the result, on every rank, whether or not that rank had
the alias.

Determinism: with float64 sums (the jobs accumulate float64 when distributed) the result differs from a
one-process run by float64 rounding only; the solvers read float32 copies, so the world size does not
change a solved weight except where a value falls within 1e-16 of a rounding boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def _reduce_op(name: str):
    import torch.distributed as dist

    field = name.split("/")[1] if name.count("/") >= 2 else ""
    return {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}.get(field, dist.ReduceOp.SUM)


def _fill(name: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """A rank's stand-in for a statistic it has no data for: the identity of the name's reduction."""
    field = name.split("/")[1] if name.count("/") >= 2 else ""
    if field in ("min", "max"):
        return torch.full(shape, float("inf") if field == "min" else float("-inf"), dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def all_reduce_statistics(holders: Iterable, select: Callable[[str], bool], group=None) -> None:
    """Combine, across the ranks of ``group``, the statistics whose names ``select`` accepts, of every
    holder (an ``Observer`` or the ``MoERecorder``: ``tensors`` and ``counts`` dicts), in place."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    for h in holders:
        mine = {n: t for n, t in h.tensors.items() if select(n)}
        first_of: dict[int, str] = {}
        aliases = {}
        for n in sorted(mine):
            canonical = first_of.setdefault(mine[n].data_ptr(), n)
            if canonical != n:
                aliases[n] = canonical
        info = (
            {n: (tuple(t.shape), str(t.dtype).replace("torch.", "")) for n, t in mine.items()},
            aliases,
            {k: int(v) for k, v in h.counts.items() if select(k)},
        )
        everyone: list = [None] * world
        dist.all_gather_object(everyone, info, group=group)
        shapes: dict[str, tuple] = {}
        parent: dict[str, str] = {}  # shared groups, joined over every rank's aliases (union-find)
        counts: dict[str, int] = {}

        def root(n: str, parent=parent) -> str:
            while parent.get(n, n) != n:
                n = parent[n]
            return n

        for rank_shapes, rank_aliases, rank_counts in everyone:
            shapes.update(rank_shapes)
            for n, canonical in rank_aliases.items():
                a, b = root(n), root(canonical)
                if a != b:
                    parent[max(a, b)] = min(a, b)
            for k, v in rank_counts.items():
                counts[k] = counts.get(k, 0) + v
        for n in sorted(shapes):
            if root(n) != n:
                continue
            t = h.tensors.get(n)
            if t is None:
                shape, dtype = shapes[n]
                t = h.tensors[n] = _fill(n, shape, getattr(torch, dtype))
            dist.all_reduce(t, op=_reduce_op(n), group=group)
        for n in shapes:
            if root(n) != n:
                h.tensors[n] = h.tensors[root(n)]
        h.counts.update(counts)
