"""Fixtures of the KV-cache tests: small random models of the calib tests with their K/V statistics."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.calib._tiny import build  # noqa: E402


def plan_for(model, targets="kv", seed=1, samples=4, length=32):
    """A full-rank KVPlan of ``model`` calibrated on random token ids."""
    from calibra.api import calibrate
    from calibra.kv import KVPlan, bases_from_stats
    from calibra.models import get_adapter

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (samples, length), generator=g)
    stats = calibrate(model, (ids, None), observers=("kv",), progress=False, echo=None, device="cpu")
    ad = get_adapter(model)
    keys = [ad.layer_name(i) for i in range(len(ad.layers))]
    which = ("k", "v") if targets == "kv" else ("v",)
    return KVPlan(bases={w: bases_from_stats(stats, keys, w) for w in which})


@pytest.fixture(scope="module")
def llama():
    return build("llama")


@pytest.fixture(scope="module")
def llama_plan(llama):
    return plan_for(llama)
