"""The compressed cache: full rank reproduces the model, rank r stores r/head_dim of the bytes, generation
through transformers' generate() works, and prefill == step-by-step decoding (one path for eval and
generation)."""

from __future__ import annotations

import pytest
import torch

from calibra.compat.transformers import with_cache
from calibra.kv import KVCompressedLM, PCACache, measure_bytes
from tests.calib._tiny import build
from tests.kv.conftest import plan_for


def _ids(model, B=2, T=20, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (B, T), generator=g)


@pytest.mark.parametrize("arch, targets", [("llama", "v"), ("llama", "kv"), ("qwen3", "kv"), ("qwen2", "kv")])
def test_full_rank_projection_reproduces_logits(arch, targets):
    model = build(arch)
    plan = plan_for(model, targets)
    x = _ids(model)
    with torch.no_grad():
        ref = model(x).logits
        full = KVCompressedLM(model, plan, project_full_rank=True)(x).logits
        low = KVCompressedLM(model, plan.uniform(2))(x).logits
    assert torch.allclose(full, ref, atol=2e-5, rtol=1e-5), (full - ref).abs().max()
    # the projection really runs: a low rank changes the logits
    assert (low - ref).abs().max() > 1e-3


@pytest.mark.parametrize("rank", [1, 4, 11, 15])
def test_rank_r_stores_r_over_head_dim_of_the_bytes(llama, llama_plan, rank):
    from transformers import DynamicCache

    x = _ids(llama, B=3, T=17)
    dense, comp = DynamicCache(config=llama.config), PCACache(llama, llama_plan.uniform(rank))
    with torch.no_grad():
        llama(x, **with_cache(llama, dense), use_cache=True)
        llama(x, **with_cache(llama, comp), use_cache=True)
    d = llama_plan.head_dim
    for dl, cl in zip(dense.layers, comp.layers):
        # bytes measured from the tensors each cache holds
        assert cl.values.nbytes * d == dl.values.nbytes * rank
        assert cl.keys.nbytes * d == dl.keys.nbytes * rank
        assert cl.positions.nbytes == 3 * 17 * 4  # int32 position per token and row, for re-applying RoPE
        assert cl.get_seq_length() == dl.get_seq_length() == 17
    mem = measure_bytes(llama, llama_plan.uniform(rank), x)
    assert mem["v_ratio"] == rank / d
    assert mem["compressed"]["v"] == sum(layer.values.nbytes for layer in comp.layers)


def test_values_only_stores_keys_uncompressed(llama):
    plan = plan_for(llama, "v").uniform(4)
    x = _ids(llama)
    mem = measure_bytes(llama, plan, x)
    assert mem["compressed"]["k"] == mem["dense"]["k"] and mem["compressed"]["positions"] == 0
    assert mem["compressed"]["v"] * 16 == mem["dense"]["v"] * 4
    assert mem["ratio"] == pytest.approx((16 + 4) / 32)


def test_prefill_equals_step_by_step_decoding(llama, llama_plan):
    """Every K/V passes through the cache in both cases, so perplexity measured with KVCompressedLM is the
    quality generation gets."""
    plan = llama_plan.with_ranks({"k": [5, 3], "v": [4, 6]})
    x = _ids(llama, B=2, T=12)
    with torch.no_grad():
        full = KVCompressedLM(llama, plan)(x).logits
        cache = PCACache(llama, plan)
        steps = [llama(x[:, :5], **with_cache(llama, cache), use_cache=True).logits]
        for t in range(5, 12):
            steps.append(llama(x[:, t : t + 1], **with_cache(llama, cache), use_cache=True).logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_generate_full_rank_matches_plain_model(llama, llama_plan):
    x = _ids(llama, B=2, T=10)
    plain = llama.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, pad_token_id=0)
    comp = llama.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=0,
        **with_cache(llama, PCACache(llama, llama_plan, project_full_rank=True)),
    )
    assert torch.equal(plain, comp)


def test_generate_left_padded_batch_full_rank_matches(llama, llama_plan):
    """Left padding shifts position ids per row: the cache must re-apply RoPE at the true positions."""
    x = _ids(llama, B=2, T=10)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    x[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    plain = llama.generate(x, **kw)
    comp = llama.generate(x, **with_cache(llama, PCACache(llama, llama_plan, project_full_rank=True)), **kw)
    assert torch.equal(plain, comp)


def test_generate_low_rank_runs_and_uses_the_cache(llama, llama_plan):
    x = _ids(llama, B=1, T=8)
    cache = PCACache(llama, llama_plan.uniform(3))
    out = KVCompressedLM(llama, llama_plan.uniform(3)).generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 14)
    out2 = llama.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0, **with_cache(llama, cache))
    assert torch.equal(out, out2)
    assert cache.layers[0].values.shape[-1] == 3 and cache.get_seq_length() == 13


def test_key_compression_without_positions_is_a_clear_error(llama, llama_plan):
    cache = PCACache(llama, llama_plan.uniform(4))
    k = torch.randn(1, 2, 3, 16)
    with pytest.raises(RuntimeError, match="positions of the new keys"):
        cache.update(k, k, 0)


def test_crop_and_batch_select_keep_positions_aligned(llama, llama_plan):
    cache = PCACache(llama, llama_plan.uniform(4))
    x = _ids(llama, B=3, T=9)
    with torch.no_grad():
        llama(x, **with_cache(llama, cache), use_cache=True)
    cache.crop(-2)
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == layer.positions.shape[-1] == 7
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert layer.keys.shape[0] == layer.positions.shape[0] == 2
