"""Auto-tune: the ranks per layer (and per K/V) with the largest saving that meet a quality budget.

Budget: ``metric="ppl"`` -- the perplexity increase over the uncompressed model (absolute, e.g. 0.05),
or ``metric="kl"`` -- the mean KL(uncompressed || compressed) per token, in nats.

Search (every number in it is measured, on the *tuning* stream -- calibration text -- never on the eval
text, which only verifies the result afterwards):

1. **Sensitivity.** For every slot (a layer's V, or K) and every rank of the grid ``d, 3d/4, d/2, 3d/8,
   d/4, d/8, d/16`` below full, the metric with only that slot compressed, all others at full rank.
2. **Greedy allocation.** Starting from full ranks, repeatedly lower the one slot whose next grid step
   costs the least metric per byte saved, predicting the combined metric as the sum of the slots'
   measured changes (each clamped at >= 0: an "improvement" is not credit), while the prediction stays
   within budget. Every rank unit of every slot costs the same bytes (same heads, same dtype), so the
   most rank units removed is the largest saving.
3. **Verification and back-off.** The combined ranks are measured; while the measurement exceeds the
   budget, the last greedy step is undone and the result measured again.

When not even one slot's first step below full rank fits (measured first, for every slot),
:class:`NoCompressionFits` is raised with what was measured -- no preset pretending to compress is written.
"""

from __future__ import annotations

import copy

from calibra.kv.basis import rank_grid
from calibra.kv.measure import metric_value

METRICS = ("ppl", "kl")


class NoCompressionFits(RuntimeError):
    """No rank below full meets the budget. ``report`` holds the measured sensitivity table."""

    def __init__(self, msg: str, report: dict):
        super().__init__(msg)
        self.report = report


def _fmt_metric(metric: str) -> str:
    return "perplexity increase" if metric == "ppl" else "mean KL (nats/token)"


def sensitivity_table(report: dict) -> str:
    """The measured rank-vs-metric table of a tuning report (one row per slot, one column per rank)."""
    grid = report["grid"]
    lines = [f"{'slot':<10}" + "".join(f"{'r=' + str(r):>11}" for r in grid[1:])]
    for w in ("v", "k"):
        for layer, row in sorted((report["sensitivity"].get(w) or {}).items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"{w.upper() + ' layer ' + str(layer):<10}"
                + "".join(f"{row[str(r)]:>+11.4f}" if str(r) in row else f"{'-':>11}" for r in grid[1:])
            )
    return "\n".join(lines)


def autotune(probe, full_plan, *, metric: str, budget: float, progress: bool = True, echo=print):
    """``(plan, report)``: the tuned :class:`~calibra.kv.plan.KVPlan` and what was measured on the way.
    ``probe`` is a :class:`~calibra.kv.measure.QualityProbe` on the tuning stream."""
    from tqdm.auto import tqdm

    if metric not in METRICS:
        raise ValueError(f"[kv] metric must be 'ppl' or 'kl', got {metric!r}")
    say = echo or (lambda *a, **k: None)
    n, d = full_plan.num_layers, full_plan.head_dim
    grid = rank_grid(d)
    whiches = [w for w in ("v", "k") if w in full_plan.bases]
    slots = [(w, i) for w in whiches for i in range(n)]
    full = {w: [d] * n for w in whiches}

    def measure(ranks) -> float:
        return metric_value(probe.measure(full_plan.with_ranks(ranks)), metric)

    sens: dict[str, dict[str, dict[str, float]]] = {w: {str(i): {} for i in range(n)} for w in whiches}
    report = {
        "metric": metric,
        "metric_description": _fmt_metric(metric),
        "budget": budget,
        "grid": grid,
        "sensitivity": sens,
        "tuning": {
            "dataset": probe.session.dataset,
            "tokens": int(probe.ids.numel()),
            "seq_len": probe.session.seq_len,
            "stride": probe.session.stride,
        },
    }
    bar = tqdm(total=len(slots) * (len(grid) - 1), desc="kv sensitivity", unit="eval", disable=not progress)
    # the first grid step of every slot first: when none of them fits, nothing lower will be tried
    for column in ([grid[1]], grid[2:]):
        for w, i in slots:
            for r in column:
                ranks = copy.deepcopy(full)
                ranks[w][i] = r
                sens[w][str(i)][str(r)] = measure(ranks)
                bar.update(1)
        cheapest = min(sens[w][str(i)][str(grid[1])] for w, i in slots)
        if cheapest > budget:
            bar.close()
            raise NoCompressionFits(
                f"[kv] no compression fits the budget: the cheapest single step (one layer's "
                f"{'/'.join(w.upper() for w in whiches)} at rank {grid[1]} of {d}) already costs a "
                f"{_fmt_metric(metric)} of {cheapest:+.4f} > {budget} on the tuning text. Loosen the budget or use "
                f"a fixed --rank; measured (rows: slot, columns: rank):\n{sensitivity_table(report)}",
                report,
            )
    bar.close()

    # greedy allocation on the additive prediction
    idx = {s: 0 for s in slots}
    predicted, steps = 0.0, []

    def cost(s, j):
        # a step measured *below* the baseline counts as free, never as credit for other steps: on a few
        # thousand tuning tokens such improvements are mostly noise, and banking them overshoots the budget
        return 0.0 if j == 0 else max(0.0, sens[s[0]][str(s[1])][str(grid[j])])

    while True:
        best = None
        for s in slots:
            j = idx[s]
            if j + 1 >= len(grid):
                continue
            dm = cost(s, j + 1) - cost(s, j)
            if predicted + dm > budget:
                continue
            key = (dm / (grid[j] - grid[j + 1]), s)
            if best is None or key < best[0]:
                best = (key, s, dm)
        if best is None:
            break
        _, s, dm = best
        idx[s] += 1
        predicted += dm
        steps.append({"which": s[0], "layer": s[1], "rank": grid[idx[s]], "predicted": predicted})

    def ranks_of(ix):
        out = copy.deepcopy(full)
        for (w, i), j in ix.items():
            out[w][i] = grid[j]
        return out

    measured = measure(ranks_of(idx))
    checks = [{"steps": len(steps), "measured": measured}]
    while measured > budget and steps:
        last = steps.pop()
        idx[(last["which"], last["layer"])] -= 1
        measured = measure(ranks_of(idx))
        checks.append({"steps": len(steps), "measured": measured})
    if measured > budget:  # only possible if a single step measured alone differs from itself: never silent
        raise NoCompressionFits(
            f"[kv] no compression fits the budget {budget} on the tuning text (last measured {measured:+.4f})", report
        )
    ranks = ranks_of(idx)
    report.update(
        {
            "steps": steps,
            "checks": checks,
            "ranks": ranks,
            "tuned_value": measured,
            "predicted_value": steps[-1]["predicted"] if steps else 0.0,
        }
    )
    say(
        f"[kv] auto-tune: {len(steps)} rank steps; measured {_fmt_metric(metric)} {measured:+.4f} on the tuning "
        f"text (budget {budget}); ranks " + ", ".join(f"{w.upper()} {ranks[w]}" for w in whiches)
    )
    return full_plan.with_ranks(ranks), report
