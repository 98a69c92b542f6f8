"""Per-layer attribution: ranks the most damaged layer first and leaves the reference intact."""

from __future__ import annotations

import copy

import pytest
import torch

from calibra.eval import attribute_layers, evaluate
from tests.eval.tiny import make_llama

PROTO = dict(seq_len=128, stride=64)


def damaged(model, scales: dict[int, float], seed: int = 3):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, s in scales.items():
            for p in out.model.layers[i].parameters():
                if p.ndim == 2:
                    p.add_(torch.randn(p.shape, generator=gen) * s * p.std())
    return out


@pytest.fixture(scope="module")
def four_layers(tokenizer):
    return make_llama(len(tokenizer), seed=5, layers=4)


def test_ranks_the_most_perturbed_layer_first(four_layers, eval_ids):
    ref = four_layers
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    layer_objs = list(ref.model.layers)
    cmp_model = damaged(ref, {0: 0.03, 1: 0.1, 2: 0.4, 3: 0.0})
    a = attribute_layers(ref, cmp_model, eval_ids[:400], **PROTO)
    assert [c.layer for c in a.layers][:3] == [2, 1, 0]
    assert a.layers[0].name == "model.layers.2" and a.layers[0].kl_mean > 0 and a.layers[0].ppl_delta != 0
    # an untouched layer swapped in changes nothing: exactly zero
    untouched = next(c for c in a.layers if c.layer == 3)
    assert untouched.kl_mean == 0.0 and untouched.ppl_delta == 0.0
    # the reference model is restored: same modules, same weights
    assert list(ref.model.layers) == layer_objs
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert a.full is not None and a.full["kl_mean"] > 0
    by_ppl = attribute_layers(ref, cmp_model, eval_ids[:400], rank_by="ppl", include_full=False, **PROTO)
    assert by_ppl.layers[0].layer == 2 and by_ppl.full is None
    assert "model.layers.2" in a.table().splitlines()[1]


def test_evaluate_with_attribution(four_layers, tokenizer):
    cmp_model = damaged(four_layers, {1: 0.3})
    r = evaluate(
        cmp_model,
        reference=four_layers,
        tokenizer=tokenizer,
        metric="kl-divergence",
        max_tokens=600,
        attribution=True,
        **PROTO,
    )
    att = r.to_dict()["attribution"]
    assert att["layers"][0]["layer"] == 1
    # default slice: 4 windows of the protocol
    assert att["tokens"] == 128 + 3 * 64 - 1
    # with only layer 1 damaged, the hybrid *is* the compressed model
    assert att["layers"][0]["kl_mean"] == pytest.approx(att["full"]["kl_mean"], rel=1e-6)


def test_architecture_mismatch_is_refused(four_layers, tokenizer, eval_ids):
    three = make_llama(len(tokenizer), layers=3)
    with pytest.raises(ValueError, match="same number of decoder layers"):
        attribute_layers(four_layers, three, eval_ids[:300], **PROTO)


def test_moe_model_perplexity_and_attribution(tokenizer, eval_ids):
    """A Mixtral (fused 3-D expert weights in transformers 5): same protocol, same attribution."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from calibra.eval import perplexity_from_ids
    from tests.eval.tiny import direct_perplexity

    cfg = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    moe = MixtralForCausalLM(cfg).eval()
    ids = eval_ids[:400]
    r = perplexity_from_ids(moe, ids, **PROTO)
    want, count = direct_perplexity(moe, ids, **PROTO)
    assert r.tokens == count and r.ppl == pytest.approx(want, rel=1e-5)
    hurt = copy.deepcopy(moe)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hurt.model.layers[2].mlp.parameters():  # experts (3-D) and router
            p.add_(torch.randn(p.shape, generator=gen) * 0.3 * p.std())
    a = attribute_layers(moe, hurt, ids, include_full=False, **PROTO)
    assert a.layers[0].layer == 2 and a.layers[0].kl_mean > 0
    assert all(c.kl_mean == 0.0 for c in a.layers[1:])
