"""Mixture-of-experts calibration: routing counts, per-expert inputs, coverage, shrinkage, selection.

Experts are observed **under the model's normal routing**: the MoE block's input tokens (unpadded)
go through the block's own router; every expert's statistics are fed the tokens routed to it
(``gate_up_proj`` input) and ``act(x W_gate^T) * (x W_up^T)`` computed with that expert's weights
(``down_proj`` input). Forcing tokens through every expert, as some tools do to fill rare experts,
feeds an expert inputs it never sees at inference; instead calibra

1. **selects more samples** (``calibra.calib.coverage.select_samples_for_coverage``): from a seeded
   candidate pool it adds samples, in order, that route tokens to experts still under a token quota,
   until every expert of every layer reaches the quota or the pool is exhausted (the experts that missed are reported);
2. **shrinks** each expert's mean Hessian toward the layer's pooled mean Hessian (all experts'
   tokens) with weight ``lambda = tau / (n_e + tau)`` on the pooled one: an expert that saw many
   tokens keeps its own statistics, one that saw few borrows strength from its layer, one that saw
   none gets the pooled Hessian (finite, never NaN: FAULTS row 21). ``lambda`` is recorded per expert;
3. reports a **coverage table** (tokens and router probability mass per expert, quota met or not,
   lambda) with every run.

Statistics: ``moe/tokens/<block>`` ``[E]`` int64 (tokens routed to each expert, counted once per
token-expert pair), ``moe/prob_mass/<block>`` ``[E]`` float64 (sum over tokens of the router's
softmax probability), ``counts["moe/<block>"]`` = tokens that entered the block.
"""

from __future__ import annotations

import torch

from calibra.mps import mps_semantics, on_host

DEFAULT_TAU = 256.0


def _tau(moe: dict) -> float:
    v = moe.get("tau")
    return DEFAULT_TAU if v is None else float(v)


class MoERecorder:
    """Routing statistics of every MoE block, optionally per calibration sample (for selection)."""

    def __init__(self, per_sample: bool = False):
        self.tensors: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.blocks: dict[str, dict] = {}
        self.per_sample = per_sample
        self.sample_counts: dict[str, dict[int, torch.Tensor]] = {}

    def observe(
        self,
        key: str,
        block,
        x: torch.Tensor,
        row_ids: torch.Tensor,
        sample_ids: list[int],
        observers,
        index: torch.Tensor | None = None,
    ) -> None:
        """``x [n, H]``: the block's unpadded input tokens; ``row_ids [n]``: their batch rows; ``index
        [n, k]``: the experts the model chose for them (read from the experts' call), or None to route ``x``
        with the block's router here. Indices outside ``0..E-1`` (a router's "zero" experts) count for none."""
        E = block.num_experts
        self.blocks.setdefault(key, {"num_experts": E, "top_k": block.top_k, "fused": block.fused})
        probs, index = block.route(x) if index is None else (block.probs(x, index), index)
        index = index.long()
        tokens = torch.bincount(index[(index >= 0) & (index < E)], minlength=E).cpu()
        if mps_semantics(probs.device):  # MPS has no float64: the mass is summed on the CPU
            with on_host():
                mass = probs.cpu().double().sum(0)
        else:
            mass = probs.double().sum(0).cpu()
        for field_, val in (("tokens", tokens), ("prob_mass", mass)):
            name = f"moe/{field_}/{key}"
            self.tensors[name] = val if name not in self.tensors else self.tensors[name] + val
        self.counts[f"moe/{key}"] = self.counts.get(f"moe/{key}", 0) + int(x.shape[0])
        if self.per_sample:
            per = self.sample_counts.setdefault(key, {})
            for r in row_ids.unique().tolist():
                sel = index[row_ids == r]
                c = torch.bincount(sel[(sel >= 0) & (sel < E)], minlength=E).cpu()
                s = sample_ids[r]
                per[s] = c if s not in per else per[s] + c
        if not observers:
            return
        for e in range(E):
            hit = (index == e).any(dim=-1)
            xe = x[hit]
            with torch.no_grad():
                down_in = block.down_input(e, xe)
            for obs in observers:
                obs.linear(f"{key}.experts.{e}.gate_up_proj", xe)
                obs.linear(f"{key}.experts.{e}.down_proj", down_in)


def _split_expert_key(module: str) -> tuple[str, int, str]:
    block, rest = module.rsplit(".experts.", 1)
    e, proj = rest.split(".", 1)
    return block, int(e), proj


def shrunk_hessian(stats, module: str, tau: float | None = None) -> tuple[torch.Tensor, float]:
    """``(mean Hessian shrunk toward the layer's pooled mean, lambda)`` for an expert projection."""
    tau = _tau(stats.metadata.get("moe", {})) if tau is None else float(tau)
    block, e, proj = _split_expert_key(module)
    E = int(stats.metadata.get("moe", {}).get("blocks", {}).get(block, {}).get("num_experts", 0))
    if E == 0:
        E = 1 + max(_split_expert_key(m)[1] for m in stats.modules() if m.startswith(block + ".experts."))
    keys = [f"{block}.experts.{i}.{proj}" for i in range(E)]
    n_e = stats.count("hessian", module)
    n_pool = sum(stats.count("hessian", k) for k in keys)
    if n_pool == 0:
        raise ValueError(
            f"[moe] no expert of {block} received any calibration token; use more or different calibration data"
        )
    H_e = stats.tensors[f"hessian/sum/{module}"]
    pooled = sum(stats.tensors[f"hessian/sum/{k}"] for k in keys) / n_pool
    lam = 1.0 if n_e == 0 else tau / (n_e + tau)
    if lam == 1.0:
        return pooled, lam
    return (1 - lam) * (H_e / n_e) + lam * pooled, lam


def refresh_coverage(stats) -> list[dict]:
    """Recompute the per-expert coverage rows (``metadata["moe"]["coverage"]``) from the counts."""
    moe = stats.metadata.setdefault("moe", {})
    quota, tau = moe.get("quota"), _tau(moe)
    rows = []
    for block in sorted(moe.get("blocks", {}), key=_natural):
        tokens = stats.tensors[f"moe/tokens/{block}"]
        mass = stats.tensors[f"moe/prob_mass/{block}"]
        n_in = max(1, stats.counts.get(f"moe/{block}", 0))
        with on_host():  # float64 statistics live on the CPU (MPS has no float64)
            mass = mass.cpu().tolist()
        for e in range(tokens.numel()):
            n = int(tokens[e])
            rows.append(
                {
                    "block": block,
                    "expert": e,
                    "tokens": n,
                    "prob_share": float(mass[e]) / n_in,
                    "quota_met": None if quota is None else n >= quota,
                    "lambda": 1.0 if n == 0 else tau / (n + tau),
                }
            )
    moe["coverage"] = rows
    return rows


def _natural(s: str):
    return [int(p) if p.isdigit() else p for p in s.replace(".", " ").split()]


def coverage_table(stats, max_rows: int = 64) -> str:
    """Plain-text coverage table. Beyond ``max_rows`` experts it prints one summary line per block plus
    every expert that missed its quota or saw no token."""
    moe = stats.metadata.get("moe")
    if not moe or not moe.get("blocks"):
        return "MoE coverage: the model has no MoE layers"
    rows = moe.get("coverage") or refresh_coverage(stats)
    quota = moe.get("quota")
    head = (
        f"MoE coverage ({len(moe['blocks'])} MoE layers; quota "
        f"{'none' if quota is None else f'{quota} tokens'}; shrinkage tau {_tau(moe):g}; "
        f"lambda = weight of the layer's pooled Hessian)"
    )
    w = max(len("block"), *(len(r["block"]) for r in rows))
    line = f"{'block':<{w}}  {'expert':>6}  {'tokens':>8}  {'prob mass':>9}  {'quota':>5}  {'lambda':>6}"

    def fmt(r):
        q = "-" if r["quota_met"] is None else ("met" if r["quota_met"] else "MISS")
        return (
            f"{r['block']:<{w}}  {r['expert']:>6}  {r['tokens']:>8}  {100 * r['prob_share']:>8.2f}%  "
            f"{q:>5}  {r['lambda']:>6.3f}"
        )

    out = [head, line, "-" * len(line)]
    if len(rows) <= max_rows:
        out += [fmt(r) for r in rows]
    else:
        for block in sorted(moe["blocks"], key=_natural):
            t = [r["tokens"] for r in rows if r["block"] == block]
            st = sorted(t)
            out.append(
                f"{block:<{w}}  {len(t):>6} experts: tokens min {st[0]}, median {st[len(st) // 2]}, max {st[-1]}"
            )
        weak = [r for r in rows if r["tokens"] == 0 or r["quota_met"] is False]
        out.append(f"experts below quota or without tokens: {len(weak)}")
        out += [fmt(r) for r in weak]
    missed = sum(1 for r in rows if r["quota_met"] is False)
    empty = sum(1 for r in rows if r["tokens"] == 0)
    out.append(
        f"{len(rows)} experts: {empty} saw no token (pooled Hessian used), {missed} below quota"
        if quota is not None
        else f"{len(rows)} experts: {empty} saw no token (pooled Hessian used)"
    )
    return "\n".join(out)
