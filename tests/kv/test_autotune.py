"""The auto-tuner's search, on a stand-in probe whose metric is a known function of the ranks (fast and
exact), plus one run on a real model."""

from __future__ import annotations

import pytest
import torch

from calibra.kv import NoCompressionFits, sensitivity_table
from calibra.kv.autotune import autotune


class FakeProbe:
    """``measure(plan)`` -> an eval block whose perplexity increase is ``f(ranks)``; counts the calls."""

    def __init__(self, f):
        self.f, self.calls = f, 0
        self.session = type("S", (), {"dataset": {"name": "fake"}, "seq_len": 8, "stride": 8})()
        self.ids = torch.zeros(64, dtype=torch.long)

    def measure(self, plan):
        self.calls += 1
        v = self.f(plan.ranks)
        return {"perplexity": {"increase": v}, "kl_divergence": {"mean": v / 10}}


def _cost(ranks, weights):
    # layer i, tensor w at rank r costs weights[w][i] * (d - r)^2 / d^2 (d = 16)
    return sum(weights[w][i] * ((16 - r) / 16) ** 2 for w in ranks for i, r in enumerate(ranks[w]))


def test_budget_met_and_cheap_layers_compressed_most(llama_plan):
    weights = {"k": [4.0, 0.1], "v": [1.0, 0.2]}
    probe = FakeProbe(lambda r: _cost(r, weights))
    plan, rep = autotune(probe, llama_plan, metric="ppl", budget=0.3, progress=False, echo=None)
    assert _cost(plan.ranks, weights) <= 0.3
    assert rep["tuned_value"] == pytest.approx(_cost(plan.ranks, weights))
    # the insensitive slots end lower than the sensitive ones
    assert plan.ranks["k"][1] < plan.ranks["k"][0] and plan.ranks["v"][1] <= plan.ranks["v"][0]
    # no single further grid step of any slot would still fit: the saving is maximal for the grid
    grid = rep["grid"]
    for w in ("k", "v"):
        for i in range(2):
            r = plan.ranks[w][i]
            if r != grid[-1]:
                nxt = {x: list(y) for x, y in plan.ranks.items()}
                nxt[w][i] = grid[grid.index(r) + 1]
                assert _cost(nxt, weights) > 0.3
    assert "K layer 1" in sensitivity_table(rep)


def test_non_additive_cost_is_caught_by_the_measurement_and_backed_off(llama_plan):
    """Each slot alone is cheap, together they interact: the prediction fits, the measurement does not,
    the tuner undoes steps until the measured value fits."""

    def f(ranks):
        lost = [(16 - r) / 16 for w in ranks for r in ranks[w]]
        return sum(lost) * 0.1 + 5.0 * (sum(x > 0 for x in lost) >= 3)

    probe = FakeProbe(f)
    plan, rep = autotune(probe, llama_plan, metric="ppl", budget=0.2, progress=False, echo=None)
    assert f(plan.ranks) <= 0.2
    assert len(rep["checks"]) > 1  # at least one back-off measurement
    assert rep["checks"][0]["measured"] > 0.2


def test_kl_metric(llama_plan):
    probe = FakeProbe(lambda r: _cost(r, {"k": [1, 1], "v": [1, 1]}))
    plan, rep = autotune(probe, llama_plan, metric="kl", budget=0.01, progress=False, echo=None)
    assert _cost(plan.ranks, {"k": [1, 1], "v": [1, 1]}) / 10 <= 0.01
    assert rep["metric"] == "kl"


def test_no_compression_fits_is_said_not_hidden(llama_plan):
    probe = FakeProbe(lambda r: _cost(r, {"k": [1, 1], "v": [1, 1]}) + 0.0)
    with pytest.raises(NoCompressionFits, match="no compression fits the budget") as e:
        autotune(probe, llama_plan, metric="ppl", budget=0.0001, progress=False, echo=None)
    assert "V layer 0" in str(e.value) and e.value.report["sensitivity"]["v"]["0"]


def test_real_model_autotune_meets_budget_on_tuning_stream():
    from calibra import assets
    from calibra.kv import QualityProbe
    from tests.eval.tiny import make_llama, train_tokenizer
    from tests.kv.conftest import plan_for

    tok = train_tokenizer()
    model = make_llama(len(tok), layers=2)
    full = plan_for(model, "kv")
    probe = QualityProbe(
        model, tok, dataset=assets.builtin_texts("code")[:3], seq_len=64, max_tokens=128, progress=False
    )
    plan, rep = autotune(probe, full, metric="kl", budget=0.002, progress=False, echo=None)
    again = probe.measure(plan)["kl_divergence"]["mean"]
    assert again == pytest.approx(rep["tuned_value"]) and again <= 0.002
    assert sum(plan.ranks["v"]) + sum(plan.ranks["k"]) < 4 * 16  # it did compress something
