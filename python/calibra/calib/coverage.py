"""Router-guided sample selection for MoE coverage (``calibrate(..., moe_quota=N)``): run the candidate
pool through the model once with the MoE recorder, then add candidates until every expert has seen its
quota of tokens. Kept apart from ``calibra.calib.moe`` (the recorder and the statistics it feeds) because
it drives the layer runner, which itself imports the recorder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from calibra.calib.moe import MoERecorder, _natural
from calibra.calib.runner import LayerRunner


@dataclass
class CoverageSelection:
    """Result of ``select_samples_for_coverage``."""

    indices: list[int]  # selected candidate indices, in candidate order
    tokens: dict[str, torch.Tensor]  # block -> tokens per expert over the selected samples
    missed: list[tuple[str, int, int]] = field(default_factory=list)  # (block, expert, tokens) < quota
    pool_size: int = 0

    def summary(self) -> str:
        s = f"router-guided selection: {len(self.indices)} of {self.pool_size} candidate samples"
        if self.missed:
            s += f"; {len(self.missed)} experts below quota after exhausting the pool"
        return s


def select_samples_for_coverage(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    quota: int,
    base: int,
    adapter=None,
    device=None,
    batch_size: int = 1,
    progress: bool = False,
    world=None,
) -> CoverageSelection:
    """Greedy router-guided selection over a candidate pool ``input_ids [P, L]`` (in seeded order).

    The first ``base`` candidates are always taken (the normal calibration set); then each further
    candidate is added, in order, if it routes at least one token (normal routing, measured layer by
    layer with the full model, no compression) to an expert still below ``quota``; stops when every
    expert of every MoE layer has ``quota`` tokens or the pool is exhausted.

    ``world`` (a ``calibra.jobs.distributed.World`` of several ranks): each rank routes its share of the pool
    and the per-sample counts are exchanged, so every rank makes the same selection from the whole pool.
    """
    if quota <= 0:
        raise ValueError(f"[moe] quota must be a positive token count, got {quota}")
    rec = MoERecorder(per_sample=True)
    runner = LayerRunner(
        model, adapter=adapter, device=device, observers=(), moe=rec, progress=progress, desc="routing candidates"
    )
    P = input_ids.shape[0]
    if world is not None and world.distributed:
        ids, mask, rows = world.shard(input_ids, attention_mask, "calibrate")
        runner.run(ids, mask, batch_size=min(batch_size, ids.shape[0]), sample_ids=rows)
        for counts, blocks_seen in world.everyone((rec.sample_counts, rec.blocks)):
            rec.blocks.update(blocks_seen)
            for b, per_sample in counts.items():
                rec.sample_counts.setdefault(b, {}).update(per_sample)
    else:
        runner.run(input_ids, attention_mask, batch_size=batch_size)
    blocks = sorted(rec.sample_counts, key=_natural)
    E = {b: rec.blocks[b]["num_experts"] for b in blocks}
    zero = {b: torch.zeros(E[b], dtype=torch.int64) for b in blocks}
    per = {b: [rec.sample_counts[b].get(s, zero[b]) for s in range(P)] for b in blocks}
    totals = {b: zero[b].clone() for b in blocks}
    chosen = []
    for s in range(P):
        if s >= base:
            if all(bool((totals[b] >= quota).all()) for b in blocks):
                break
            useful = any(bool(((totals[b] < quota) & (per[b][s] > 0)).any()) for b in blocks)
            if not useful:
                continue
        chosen.append(s)
        for b in blocks:
            totals[b] += per[b][s]
    missed = [(b, e, int(totals[b][e])) for b in blocks for e in range(E[b]) if totals[b][e] < quota]
    return CoverageSelection(indices=chosen, tokens=totals, missed=missed, pool_size=P)
