"""KL divergence: zero against itself, monotone in the perturbation, top-k vs exact, both directions."""

from __future__ import annotations

import copy

import pytest
import torch

from calibra.eval import collect_reference, compare, evaluate, kl_divergence_from_ids, perplexity_from_ids
from calibra.eval.kl import bucket_kl, exact_kl, token_stats, topk_buckets
from tests.eval.tiny import perturbed

PROTO = dict(seq_len=128, stride=64)


def full_logprobs(model, ids, seq_len, stride):
    """Direct oracle: every window's full log-softmax rows for its scored tokens, one window at a time."""
    from calibra.eval import plan_windows

    rows = []
    with torch.no_grad():
        for w in plan_windows(ids.numel(), seq_len, stride):
            logits = model(input_ids=ids[None, w.begin : w.end]).logits[0].float()
            rows.append(logits[w.score_from - w.begin - 1 : w.length - 1].log_softmax(-1))
    return torch.cat(rows)


def test_self_kl_is_zero(llama, eval_ids):
    twin = copy.deepcopy(llama)
    for exact in (False, True):
        r = kl_divergence_from_ids(llama, twin, eval_ids[:800], exact=exact, **PROTO)
        for st in (r.kl_ref_cmp, r.kl_cmp_ref):
            assert abs(st["mean"]) <= 1e-7 and abs(st["max"]) <= 1e-7 and abs(st["median"]) <= 1e-7
        assert r.ppl_reference == pytest.approx(r.ppl_compressed, rel=1e-7)


def test_exact_kl_equals_a_direct_computation_in_both_directions(llama, eval_ids):
    cmp_model = perturbed(llama, 0.2)
    ids = eval_ids[:700]
    r = kl_divergence_from_ids(llama, cmp_model, ids, exact=True, **PROTO)
    lp, lq = full_logprobs(llama, ids, **PROTO), full_logprobs(cmp_model, ids, **PROTO)
    # torch's kl_div(input=log q, target=log p) is sum p (log p - log q) = KL(P||Q)
    fwd = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)
    rev = torch.nn.functional.kl_div(lp, lq, log_target=True, reduction="none").sum(-1)
    assert r.tokens == fwd.numel() == 699
    assert r.kl_ref_cmp["mean"] == pytest.approx(float(fwd.double().mean()), rel=1e-5)
    assert r.kl_ref_cmp["max"] == pytest.approx(float(fwd.max()), rel=1e-5)
    assert r.kl_ref_cmp["median"] == pytest.approx(float(fwd.double().quantile(0.5)), rel=1e-5)
    assert r.kl_cmp_ref["mean"] == pytest.approx(float(rev.double().mean()), rel=1e-5)
    # the two directions are different numbers (KL is not symmetric) and both reported
    assert abs(r.kl_ref_cmp["mean"] - r.kl_cmp_ref["mean"]) > 1e-4
    # perplexities of both models on the very same tokens, equal to the perplexity metric
    assert r.ppl_reference == pytest.approx(perplexity_from_ids(llama, ids, **PROTO).ppl, rel=1e-6)
    assert r.ppl_compressed == pytest.approx(perplexity_from_ids(cmp_model, ids, **PROTO).ppl, rel=1e-6)


def test_kl_grows_with_the_perturbation(llama, eval_ids):
    ids = eval_ids[:600]
    ref = collect_reference(llama, ids, top_k=64, **PROTO)
    prev_topk = prev_fwd = prev_rev = 0.0
    for scale in (0.02, 0.05, 0.1, 0.2, 0.4):
        m = perturbed(llama, scale)
        topk = compare(m, ref, ids)
        ex = kl_divergence_from_ids(llama, m, ids, exact=True, **PROTO)
        assert topk.kl_ref_cmp["mean"] > prev_topk
        assert ex.kl_ref_cmp["mean"] > prev_fwd and ex.kl_cmp_ref["mean"] > prev_rev
        prev_topk, prev_fwd, prev_rev = topk.kl_ref_cmp["mean"], ex.kl_ref_cmp["mean"], ex.kl_cmp_ref["mean"]


def test_topk_with_k_equal_vocab_is_exact(llama, eval_ids, tokenizer):
    m = perturbed(llama, 0.2)
    ids = eval_ids[:600]
    full = kl_divergence_from_ids(llama, m, ids, top_k=len(tokenizer), **PROTO)
    ex = kl_divergence_from_ids(llama, m, ids, exact=True, **PROTO)
    assert full.top_k == len(tokenizer) and full.mode == "top-k" and ex.mode == "exact"
    for key in ("mean", "median", "max"):
        assert full.kl_ref_cmp[key] == pytest.approx(ex.kl_ref_cmp[key], rel=1e-5)
        assert full.kl_cmp_ref[key] == pytest.approx(ex.kl_cmp_ref[key], rel=1e-5)


def test_topk_is_a_lower_bound_that_tightens_with_k():
    """Per token: bucketing never increases KL, and the top-k buckets coarsen the top-k' ones."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 500, generator=gen) * 3
    lp = logits.log_softmax(-1)
    lq = (logits + 0.5 * torch.randn(200, 500, generator=gen)).log_softmax(-1)
    ex_f, ex_r = exact_kl(lp, lq)
    prev_f = prev_r = torch.zeros(200)
    for k in (1, 4, 16, 64, 256, 500):
        idx, top, rest = topk_buckets(lp, k)
        q_rest = lq.scatter(-1, idx, float("-inf")).logsumexp(-1)
        f, r = bucket_kl(top, rest, lq.gather(-1, idx), q_rest)
        assert (f >= prev_f - 1e-6).all() and (r >= prev_r - 1e-6).all()
        assert (f <= ex_f + 1e-6).all() and (r <= ex_r + 1e-6).all()
        prev_f, prev_r = f, r
    assert torch.allclose(prev_f, ex_f, atol=1e-6) and torch.allclose(prev_r, ex_r, atol=1e-6)


def test_topk_gap_on_a_perturbed_model(llama, eval_ids):
    """The approximation on a model: below the exact KL, closer with larger k, and the reference
    collected once gives the same numbers as the lockstep run."""
    m = perturbed(llama, 0.2)
    ids = eval_ids[:600]
    ex = kl_divergence_from_ids(llama, m, ids, exact=True, **PROTO)
    ratios = []
    for k in (16, 64, 256):
        r = kl_divergence_from_ids(llama, m, ids, top_k=k, **PROTO)
        assert r.kl_ref_cmp["mean"] <= ex.kl_ref_cmp["mean"] * (1 + 1e-6)
        assert r.kl_cmp_ref["mean"] <= ex.kl_cmp_ref["mean"] * (1 + 1e-6)
        ratios.append(r.kl_ref_cmp["mean"] / ex.kl_ref_cmp["mean"])
        cached = compare(m, collect_reference(llama, ids, top_k=k, **PROTO), ids)
        assert cached.kl_ref_cmp == pytest.approx(r.kl_ref_cmp, rel=1e-6)
        assert cached.kl_cmp_ref == pytest.approx(r.kl_cmp_ref, rel=1e-6)
    assert ratios[0] < ratios[1] < ratios[2] <= 1 + 1e-6
    # 256 of 384 tokens kept: most of the divergence is captured even on a random model
    assert ratios[2] > 0.8


def test_token_stats_median():
    assert token_stats(torch.tensor([3.0, 1.0, 2.0])) == {"mean": 2.0, "median": 2.0, "max": 3.0}
    assert token_stats(torch.tensor([4.0, 1.0, 2.0, 3.0]))["median"] == 2.5


def test_evaluate_kl_result(llama, tokenizer):
    m = perturbed(llama, 0.1)
    r = evaluate(m, reference=llama, tokenizer=tokenizer, metric="kl-divergence", max_tokens=500, **PROTO)
    d = r.to_dict()
    assert d["metric"] == "kl-divergence" and d["mode"] == "top-k" and d["top_k"] == 64
    assert set(d["kl_ref_cmp"]) == set(d["kl_cmp_ref"]) == {"mean", "median", "max"}
    assert 0 < d["kl_ref_cmp"]["median"] <= d["kl_ref_cmp"]["max"]
    assert d["tokens"] == 499 and d["ppl_compressed"] > 0 and d["ppl_reference"] > 0


def test_vocab_mismatch_is_refused(llama, tokenizer):
    from tests.eval.tiny import make_llama

    other = make_llama(len(tokenizer) + 10)
    with pytest.raises(ValueError, match="vocab_size"):
        evaluate(other, reference=llama, tokenizer=tokenizer, metric="kl-divergence", max_tokens=300, **PROTO)
