"""One test per transformers assumption of ``calibra.compat.transformers`` (numbered as in its docstring).

Each builds tiny random models from transformers' own config classes and checks the assumption itself
against the installed release, so a release that breaks one fails here by name."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from calibra.compat import transformers as compat
from tests.calib._tiny import ARCHS, MOE_ARCHS, build


@pytest.fixture(scope="module")
def llama():
    return build("llama")


def _attention(model, i=0):
    return model.model.layers[i].self_attn


# -- 1. the cache keyword -------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_cache_kwarg_is_declared_by_forward(arch):
    model = build(arch)
    name = compat.cache_kwarg(model)
    assert name in compat.CACHE_KWARGS
    assert name in inspect.signature(model.forward).parameters


def test_cache_passed_by_its_keyword_is_used_without_deprecation(llama, recwarn):
    cache = compat.dynamic_cache(llama)
    ids = torch.randint(1, 96, (1, 7))
    with torch.no_grad():
        llama(ids, use_cache=True, **compat.with_cache(llama, cache))
    assert cache.get_seq_length() == 7  # the model wrote into the cache we passed
    deprecations = [w for w in recwarn if issubclass(w.category, FutureWarning) and "deprecated" in str(w.message)]
    assert not deprecations, [str(w.message) for w in deprecations]


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_pre_hook_finds_the_cache(arch):
    """What the KV pre-hook relies on: the attention call's keywords hold the cache under a known name."""
    model = build(arch)
    cache = compat.dynamic_cache(model)
    seen = []
    handle = _attention(model).register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(compat.cache_from_call(kwargs)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(torch.randint(1, 96, (1, 5)), use_cache=True, **compat.with_cache(model, cache))
    finally:
        handle.remove()
    assert seen == [cache]


def test_given_cache_and_with_cache_rename():
    a, b = object(), object()
    kw = {"past_key_values": a, "x": 1}
    assert compat.given_cache(kw) is a and kw == {"x": 1}
    kw = {"cache": b}
    assert compat.given_cache(kw) is b and kw == {}
    assert compat.drop_cache_kwargs({"cache": a, "past_key_values": b, "y": 2}) == {"y": 2}


# -- 2. the cache classes ---------------------------------------------------------------------------------
def test_cache_from_layers_and_dynamic_layer_layout(llama):
    Cache, DynamicLayer, _ = compat.cache_classes()
    cfg = llama.config
    cache = Cache(layers=[DynamicLayer() for _ in range(cfg.num_hidden_layers)])
    ids = torch.randint(1, 96, (2, 6))
    with torch.no_grad():
        llama(ids, use_cache=True, **compat.with_cache(llama, cache))
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer)
        assert tuple(layer.keys.shape) == (2, cfg.num_key_value_heads, 6, head_dim)  # sequence in dim -2
        assert tuple(layer.values.shape) == (2, cfg.num_key_value_heads, 6, head_dim)
    assert cache.get_seq_length() == 6


def test_cache_update_is_the_one_read_path(llama):
    """Attention reads K/V only through ``Cache.update``: a layer that returns zeros changes the logits."""
    Cache, DynamicLayer, _ = compat.cache_classes()

    class Zeros(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            super().update(key_states, value_states, *args, **kwargs)
            return torch.zeros_like(self.keys), torch.zeros_like(self.values)

    ids = torch.randint(1, 96, (1, 6))
    with torch.no_grad():
        plain = llama(ids).logits
        same = llama(ids, use_cache=True, **compat.with_cache(llama, Cache(layers=[DynamicLayer(), DynamicLayer()])))
        zero = llama(ids, use_cache=True, **compat.with_cache(llama, Cache(layers=[Zeros(), Zeros()])))
    torch.testing.assert_close(same.logits, plain)
    assert (zero.logits - plain).abs().max() > 1e-3


# -- 3. RoPE ------------------------------------------------------------------------------------------------
def test_rope_reaches_attention_as_position_embeddings(llama):
    rotary = compat.rotary_module(llama.model)
    assert rotary is not None
    calls = []
    handle = _attention(llama).register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(compat.rope_from_call(kwargs)), with_kwargs=True
    )
    ids = torch.randint(1, 96, (2, 5))
    try:
        with torch.no_grad():
            llama(ids)
    finally:
        handle.remove()
    ((_, cos, sin),) = calls
    head_dim = llama.config.hidden_size // llama.config.num_attention_heads
    assert cos.shape == sin.shape == (2, 5, head_dim) or cos.shape == sin.shape == (1, 5, head_dim)
    x = torch.zeros(2, 5, llama.config.hidden_size)
    ref_cos, ref_sin = rotary(x, torch.arange(5)[None].expand(2, 5))
    torch.testing.assert_close(cos.expand_as(ref_cos), ref_cos)
    torch.testing.assert_close(sin.expand_as(ref_sin), ref_sin)


# -- 4. save-time renaming ----------------------------------------------------------------------------------
def test_saved_state_splits_fused_experts_to_disk_names():
    model = build("mixtral")
    sd = {k: v for k, v in model.state_dict().items() if ".layers.0." in k}
    disk = compat.saved_state(model, sd)
    experts = model.config.num_local_experts
    # per-expert Linears on disk (Mixtral's w1/w2/w3), none of the fused in-memory names
    assert not any("gate_up_proj" in k for k in disk)
    for e in range(experts):
        for w in ("w1", "w2", "w3"):
            assert any(f"experts.{e}.{w}.weight" in k for k in disk), (e, w, sorted(disk)[:8])
    # dense tensors keep their names
    assert "model.layers.0.self_attn.q_proj.weight" in disk


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_fused_experts_are_saved_as_row_runs_of_one_expert(arch):
    """``fused_expert_layout`` reads where each expert's rows go on disk; the real save of a real
    tensor puts exactly those rows there (gate rows first, then up)."""
    model = build(arch)
    experts = next(m for n, m in model.named_modules() if compat.is_fused_experts(m))
    path = next(n for n, m in model.named_modules() if m is experts)
    for proj in ("gate_up_proj", "down_proj"):
        key = f"{path}.{proj}"
        layout = compat.fused_expert_layout(model, key)
        disk = compat.saved_state(model, {key: getattr(experts, proj).detach()})
        fused = getattr(experts, proj)
        assert sorted(layout) == list(range(fused.shape[0]))
        for e, cut in layout.items():
            assert [r0 for _, r0, _ in sorted(cut, key=lambda c: c[1])][0] == 0
            for name, r0, r1 in cut:
                assert torch.equal(disk[f"{name}.weight"], fused[e, r0:r1])
        if proj == "gate_up_proj":  # two pieces per expert: gate then up
            assert all(len(cut) == 2 for cut in layout.values())
    router = next(n for n, _ in model.named_parameters() if n.endswith("gate.weight"))
    want = router.replace(".mlp.", ".block_sparse_moe.") if arch == "mixtral" else router  # Mixtral's renaming
    assert compat.disk_name(model, router, tuple(model.get_parameter(router).shape)) == want


def test_saved_state_keeps_dense_models_unchanged(llama):
    sd = llama.state_dict()
    assert set(compat.saved_state(llama, sd)) == set(sd)


# -- 5 and 6. routers and fused experts ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_router_and_fused_experts_reproduce_the_moe_block(arch):
    """The routed sum over experts rebuilt from the router output and the fused weights equals the
    block's own output (plus the shared expert where the family has one)."""
    model = build(arch)
    layer = model.model.layers[0]
    block = getattr(layer, "mlp", None) or layer.block_sparse_moe
    experts, router = block.experts, block.gate
    assert compat.is_fused_experts(experts)
    top_k = model.config.num_experts_per_tok
    x = torch.randn(9, model.config.hidden_size)
    with torch.no_grad():
        probs, index = compat.router_probs_and_topk(router(x), top_k)
        assert probs.shape == (9, experts.gate_up_proj.shape[0]) and index.shape == (9, top_k)
        weights = probs.gather(1, index)
        if getattr(model.config, "norm_topk_prob", arch == "mixtral"):
            weights = weights / weights.sum(-1, keepdim=True)
        want = torch.zeros_like(x)
        for t in range(9):
            for j in range(top_k):
                g, u, d = compat.fused_expert_weights(experts, int(index[t, j]))
                want[t] += weights[t, j] * F.linear(experts.act_fn(F.linear(x[t], g)) * F.linear(x[t], u), d)
        shared = getattr(block, "shared_expert", None)
        if shared is not None:
            want += torch.sigmoid(block.shared_expert_gate(x)) * shared(x)
        got = block(x[None])
        got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got.reshape(9, -1), want, rtol=1e-4, atol=1e-5)


def test_plain_linear_router_is_softmaxed_and_topked():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    probs, index = compat.router_probs_and_topk(logits, 2)
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    assert index.tolist() == [[1, 2]]


@pytest.mark.parametrize("model_type", ["olmoe", "deepseek_v3", "phimoe", "jamba"])
def test_standard_fused_experts_compute_the_routed_sum(model_type):
    """Assumption 6 for the families without an explicit adapter: the experts module called with the
    block's routing ``(hidden, top_k_index, top_k_weights)`` computes the weighted sum of each chosen
    expert's ``down(act(gate(x)) * up(x))`` from the fused slices, and ``experts_call_routing`` reads the
    tokens and choices from that call, by position or keyword."""
    from tests.matrix.tiny_configs import tiny_model

    model = tiny_model(model_type)
    experts = next(m for n, m in model.named_modules() if n.endswith(".experts") and compat.is_fused_experts(m))
    assert compat.standard_fused_experts_issue(experts) is None
    n_exp, hidden = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[2]
    torch.manual_seed(0)
    x = torch.randn(7, hidden)
    index = torch.stack([torch.randperm(n_exp)[:2] for _ in range(7)])
    weights = torch.rand(7, 2)
    with torch.no_grad():
        got = experts(x, index, weights)
        want = torch.zeros_like(x)
        for t in range(7):
            for j in range(2):
                g, u, d = compat.fused_expert_weights(experts, int(index[t, j]))
                want[t] += weights[t, j] * F.linear(experts.act_fn(F.linear(x[t], g)) * F.linear(x[t], u), d)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for args, kwargs in (((x, index, weights), {}), ((x,), {"top_k_index": index, "top_k_weights": weights})):
        xs, idx = compat.experts_call_routing(args, kwargs)
        assert torch.equal(xs, x) and torch.equal(idx, index)


def test_other_expert_layouts_are_named():
    from tests.matrix.tiny_configs import tiny_model

    llama4 = tiny_model("llama4_text").model.layers[0].feed_forward.experts
    assert "called as (hidden_states)" in compat.standard_fused_experts_issue(llama4)
    assert "not fused" in compat.standard_fused_experts_issue(torch.nn.Linear(2, 2))


def test_gpt_oss_experts_are_the_transposed_layout():
    """Assumption 6, GPT-OSS: ``[E, H, 2I]`` / ``[E, I, H]`` applied as ``x @ W`` with biases and its own gate,
    called with (hidden_states, router_indices, routing_weights); a standard module is not taken for it."""
    from tests.matrix.tiny_configs import tiny_model

    model = tiny_model("gpt_oss")
    ex = model.model.layers[0].mlp.experts
    assert compat.transposed_experts(ex) and compat.standard_fused_experts_issue(ex) is None
    assert not compat.transposed_experts(tiny_model("olmoe").model.layers[0].mlp.experts)
    seen = []
    h = ex.register_forward_pre_hook(lambda m, a, k: seen.append(compat.experts_call_routing(a, k)), with_kwargs=True)
    ids = torch.randint(3, 300, (2, 6))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    x, index = seen[0]
    assert x.shape == (12, model.config.hidden_size) and index.shape == (12, model.config.num_experts_per_tok)
    with torch.no_grad():
        _, _, want = model.model.layers[0].mlp.router(x)
    assert torch.equal(index, want)
    w = torch.randn_like(compat.expert_slice(ex, "down_proj", 3))
    compat.store_expert_slice(ex, "down_proj", 3, w)
    assert torch.equal(ex.down_proj[3], w.T)


def test_dbrx_and_jetmoe_expert_layouts():
    """Assumption 6, DBRX: ``mlp.w1`` / ``v1`` / ``w2`` ``[E*I, H]`` with expert ``e`` in rows ``e*I:(e+1)*I``,
    ``w2`` applied transposed, called with the block's routing; JetMoE: the block's own ``input_linear [E, 2I,
    H]`` (gate rows first) / ``output_linear [E, H, I]``. For each, the routed sum computed from calibra's
    ``[out, in]`` slices equals the module's output, and a stored slice lands in the expert's own rows."""
    from tests.matrix.tiny_configs import tiny_model

    torch.manual_seed(0)
    dbrx = tiny_model("dbrx").transformer.blocks[0].ffn.experts
    jet = tiny_model("jetmoe").model.layers[0].mlp
    assert compat.stacked_glu_experts(dbrx) and compat.standard_fused_experts_issue(dbrx) is None
    assert compat.parallel_experts(jet) and not compat.parallel_experts(
        tiny_model("jetmoe").model.layers[0].self_attention.experts
    )
    for ex in (jet, dbrx):
        assert not compat.stacked_glu_experts(jet) and not compat.parallel_experts(dbrx)
        n = compat.fused_expert_count(ex)
        x = torch.randn(6, compat.expert_slice(ex, "gate_up_proj", 0).shape[1])
        with torch.no_grad():
            if ex is dbrx:  # every token to expert n-1 with weight 1
                try:
                    want = ex(x, torch.full((6, 1), n - 1), torch.ones(6, 1)).reshape(6, -1)
                except IndexError:  # transformers 5.6's DbrxExperts.forward reshapes its input by ffn_hidden_size
                    pytest.skip("this transformers' DbrxExperts cannot run its own forward: no reference to compare")
            else:  # JetMoE's experts take the tokens sorted by expert and the per-expert counts
                sizes = [0] * (n - 1) + [6]
                gate, up = ex.input_linear(x, sizes).chunk(2, dim=-1)
                want = ex.output_linear(ex.activation(gate) * up, sizes)
            got = F.linear(compat.expert_down_input(ex, n - 1, x), compat.expert_slice(ex, "down_proj", n - 1))
        torch.testing.assert_close(got, want)
        for proj in ("gate_up_proj", "down_proj"):
            w = torch.randn_like(compat.expert_slice(ex, proj, 1))
            before = {k: v.clone() for k, v in ex.state_dict().items()}
            compat.store_expert_slice(ex, proj, 1, w)
            assert torch.equal(compat.expert_slice(ex, proj, 1), w)
            for k in before:  # only expert 1's rows of proj's own parameters changed
                changed = (ex.state_dict()[k] != before[k]).nonzero()
                if k.removesuffix(".weight") not in [p.removesuffix(".weight") for p in compat.expert_params(ex, proj)]:
                    assert changed.numel() == 0, k
                elif ex is dbrx:
                    assert changed[:, 0].div(ex.ffn_hidden_size, rounding_mode="floor").unique().tolist() == [1], k
                else:
                    assert changed[:, 0].unique().tolist() == [1], k


# family -> (path of an MoE block's experts in its tiny model, the layout predicate they satisfy)
_FLAGGED_LAYOUTS = {
    "aria_text": ("model.layers.0.mlp.experts", "transposed_glu_experts"),
    "ergo": ("model.layers.1.mlp.experts", "ungated_experts"),
    "nemotron_h": ("model.layers.1.mixer.experts", "ungated_experts"),
    "minimax_m3_vl_text": ("model.layers.0.mlp.experts", "is_fused_experts"),
}


@pytest.mark.parametrize("model_type", sorted(_FLAGGED_LAYOUTS))
def test_flagged_and_ungated_expert_layouts(model_type):
    """Assumption 6, the layouts read off transformers' ``use_experts_implementation`` flags: Aria's
    ``is_transposed`` gate/up ``[E, H, 2I]`` (gate columns first), Nemotron-H's and Ergo's ``has_gate=False``
    ``up_proj`` (Ergo's transposed), MiniMax-M3's own ``_apply_gate``. The module's output for tokens all
    routed to one expert equals calibra's ``[out, in]`` slices applied to its down-projection input, and a
    stored slice lands in that expert alone, in the parameter the layout names."""
    from transformers import CONFIG_MAPPING

    from tests.matrix.tiny_configs import tiny_model

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type}")
    path, layout = _FLAGGED_LAYOUTS[model_type]
    model = tiny_model(model_type)
    try:
        ex = model.get_submodule(path)
    except AttributeError:
        pytest.skip(f"this transformers' {model_type} keeps its experts elsewhere")
    if model_type == "aria_text" and not isinstance(getattr(ex, "gate_up_proj", None), torch.Tensor):
        # transformers 5.6's Aria runs grouped GEMM modules (fc1 / fc2), not fused parameters: dense, named
        assert "not fused" in compat.standard_fused_experts_issue(ex)
        return
    assert getattr(compat, layout)(ex) and compat.standard_fused_experts_issue(ex) is None
    assert compat.expert_weights_transposed(ex) == (getattr(ex, "is_transposed", False) is True)
    n = compat.fused_expert_count(ex)
    torch.manual_seed(0)
    x = torch.randn(6, compat.expert_slice(ex, "gate_up_proj", 0).shape[1])
    with torch.no_grad():
        want = ex(x, torch.full((6, 1), n - 1), torch.ones(6, 1))
        got = F.linear(compat.expert_down_input(ex, n - 1, x), compat.expert_slice(ex, "down_proj", n - 1))
        if getattr(ex, "post_expert_norm", None) is not None:  # Ergo: each expert's norm after its down projection
            got = ex.post_expert_norm(got, torch.full((6,), n - 1))
    torch.testing.assert_close(got, want)
    for proj in ("gate_up_proj", "down_proj"):
        w = torch.randn_like(compat.expert_slice(ex, proj, 1))
        before = {k: v.clone() for k, v in ex.state_dict().items()}
        compat.store_expert_slice(ex, proj, 1, w)
        assert torch.equal(compat.expert_slice(ex, proj, 1), w)
        (param,) = compat.expert_params(ex, proj)
        for k in before:  # only expert 1 of proj's own parameter changed
            changed = (ex.state_dict()[k] != before[k]).nonzero()
            assert changed[:, 0].unique().tolist() == ([1] if k == param else []), k


def test_llama4_experts_are_swapped_on_a_compressed_tensors_load():
    """Assumption 7: transformers swaps Llama 4's fused experts for per-expert Linears on a
    compressed-tensors load; the per-expert tensors calibra writes make that replacement compute what the
    fused module computes."""
    from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION as table

    from tests.matrix.tiny_configs import tiny_model

    model = tiny_model("llama4_text")
    paths = compat.swapped_on_quantized_load(model)
    assert paths == [f"model.layers.{i}.feed_forward.experts" for i in range(len(model.model.layers))]
    assert compat.swapped_on_quantized_load(model, "gptq") == []
    experts = model.get_submodule(paths[0])
    seq = table["Llama4TextExperts"]["module_name"](model.config.get_text_config())
    seq.load_state_dict(compat.per_expert_tensors(experts), strict=True)
    torch.manual_seed(0)
    x = torch.randn(experts.num_experts * 5, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(seq(x).reshape(x.shape), experts(x), rtol=1e-5, atol=1e-6)
