"""The layer-sequential runner against a full-model forward, on every supported architecture."""

from __future__ import annotations

import pytest
import torch

from calibra.calib import CalibrationOOMError, LayerRunner, NonFiniteActivationError
from calibra.models import get_adapter, supported_architectures
from tests.calib._tiny import ARCHS, MOE_ARCHS, UnfusedMoE, batch, build

pytest.importorskip("transformers")


def _runner_layer_outputs(model, ids, mask, batch_size, **kw):
    """Per-layer outputs of the runner's pass (rows concatenated over batches)."""
    outs = {i: [] for i in range(len(model.model.layers))}
    hooks = [
        layer.register_forward_hook(lambda m, a, o, i=i: outs[i].append(o[0] if isinstance(o, tuple) else o))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        stats = LayerRunner(model, device="cpu", progress=False, **kw).run(ids, mask, batch_size=batch_size)
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in outs.items()}, stats


def _full_forward_inputs(model, ids, mask):
    """Inputs of every Linear (and of each MoE block, with the model's own routing) in one full forward."""
    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append(a[0])))
        if hasattr(mod, "gate_up_proj"):  # fused experts: (hidden [T, H], top_k_index [T, k], weights)
            hooks.append(
                mod.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append((a[0], a[1])))
            )
    with torch.no_grad():
        r = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
    for h in hooks:
        h.remove()
    return seen, r


def test_registry_lists_supported_architectures():
    assert set(ARCHS) <= set(supported_architectures())
    with pytest.raises(ValueError, match=r"unsupported architecture.*llama.*qwen3_moe"):
        from calibra.models import check_supported

        check_supported("t5")  # an encoder-decoder: no causal-LM class in transformers


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_outputs_equal_full_forward_and_hessians_equal_xtx(arch):
    model = build(arch)
    ids, mask = batch(S=3, L=12)
    outs, stats = _runner_layer_outputs(model, ids, mask, batch_size=2, hessian_dtype=torch.float64)
    seen, ref = _full_forward_inputs(model, ids, mask)
    n = len(model.model.layers)
    for i in range(n):
        expect = ref.hidden_states[i + 1] if i < n - 1 else None
        got = outs[i] if i < n - 1 else model.model.norm(outs[i])
        expect = ref.hidden_states[-1] if expect is None else expect
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers):
        for name in adapter.linear_modules(layer):
            full = f"{adapter.layer_name(i)}.{name}"
            X = seen[full][0].reshape(-1, seen[full][0].shape[-1]).double()
            H = stats.tensors[f"hessian/sum/{full}"]
            assert H.dtype == torch.float64
            assert stats.count("hessian", full) == X.shape[0] == int(mask.sum())
            torch.testing.assert_close(H, X.T @ X, rtol=1e-5, atol=1e-6 * float((X.T @ X).abs().max()))


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_every_expert_hessian_equals_xtx_of_its_routed_tokens(arch):
    model = build(arch)
    ids, mask = batch(S=3, L=12)
    _, stats = _runner_layer_outputs(model, ids, mask, batch_size=3, hessian_dtype=torch.float64)
    seen, _ = _full_forward_inputs(model, ids, mask)
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers):
        (block,) = adapter.moe_blocks(layer)
        key = f"{adapter.layer_name(i)}.{block.name}"
        x, index = seen[f"{key}.experts"][0]
        ex = block.experts
        tokens = stats.tensors[f"moe/tokens/{key}"]
        assert int(tokens.sum()) == index.numel()
        for e in range(block.num_experts):
            xe = x[(index == e).any(-1)].double()
            g, u = ex.gate_up_proj[e].double().chunk(2, 0)
            down_in = ex.act_fn(xe @ g.T) * (xe @ u.T)
            for proj, X in (("gate_up_proj", xe), ("down_proj", down_in)):
                k = f"{key}.experts.{e}.{proj}"
                assert stats.count("hessian", k) == X.shape[0] == int(tokens[e])
                torch.testing.assert_close(stats.tensors[f"hessian/sum/{k}"], X.T @ X, rtol=1e-5, atol=1e-6)


def test_unfused_expert_layout_gets_per_expert_hessians():
    model = build("mixtral")
    fused_outs = None
    ids, mask = batch(S=2, L=12)
    with torch.no_grad():
        fused_outs = model(input_ids=ids).logits
    for layer in model.model.layers:
        layer.mlp = UnfusedMoE(layer.mlp)
    with torch.no_grad():  # the converted model computes the same function
        torch.testing.assert_close(model(input_ids=ids).logits, fused_outs, rtol=1e-4, atol=1e-4)
    adapter = get_adapter(model)
    (block,) = adapter.moe_blocks(model.model.layers[0])
    assert not block.fused and block.num_experts == 4
    assert not any(".experts." in n or n.endswith("gate") for n in adapter.linear_modules(model.model.layers[0]))
    captured = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, e=e: captured.setdefault(e, []).append(a[0]))
        for e, m in enumerate(model.model.layers[0].mlp.experts)
    ]
    _, stats = _runner_layer_outputs(model, ids, mask, batch_size=2, hessian_dtype=torch.float64)
    for h in hooks:
        h.remove()
    for e in range(4):
        key = f"model.layers.0.mlp.experts.{e}.gate_up_proj"
        X = torch.cat(captured[e]).double() if e in captured else torch.zeros(0, 64, dtype=torch.float64)
        torch.testing.assert_close(stats.tensors[f"hessian/sum/{key}"], X.T @ X, rtol=1e-5, atol=1e-6)
        assert stats.count("hessian", f"model.layers.1.mlp.experts.{e}.down_proj") >= 0


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_padded_batch_equals_unpadded_tokens(arch):
    model = build(arch)
    ids, mask = batch(S=2, L=16, lengths=[10, 16])
    _, padded = _runner_layer_outputs(
        model, ids, mask, batch_size=2, observers=("hessian", "norms"), hessian_dtype=torch.float64
    )
    parts = []
    for i, n in enumerate([10, 16]):
        _, st = _runner_layer_outputs(
            model, ids[i : i + 1, :n], None, batch_size=1, observers=("hessian", "norms"), hessian_dtype=torch.float64
        )
        parts.append(st)
    assert padded.counts == {k: parts[0].counts[k] + parts[1].counts[k] for k in padded.counts}
    assert padded.count("hessian", "model.layers.1.self_attn.q_proj") == 26
    for k, v in padded.tensors.items():
        want = parts[0].tensors[k] + parts[1].tensors[k]  # fp32 activations: same values up to rounding
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_nan_guard_names_layer_and_sample():
    model = build("llama")
    ids, mask = batch(S=4, L=8)
    ids[2, 5] = 95  # a token only sample 2 has, whose embedding is NaN
    ids[ids == 95] = 3
    ids[2, 5] = 95
    with torch.no_grad():
        model.model.embed_tokens.weight[95] = float("nan")
    with pytest.raises(NonFiniteActivationError, match=r"NaN .*model\.layers\.0\.self_attn\.q_proj.*sample 2, token 5"):
        LayerRunner(model, device="cpu", progress=False).run(ids, mask, batch_size=2)


def test_bf16_model_keeps_fp32_hessians():
    model = build("llama", dtype=torch.bfloat16)
    ids, mask = batch(S=2, L=8)
    seen, _ = _full_forward_inputs(model, ids, mask)
    _, stats = _runner_layer_outputs(model, ids, mask, batch_size=2)
    H = stats.tensors["hessian/sum/model.layers.0.self_attn.q_proj"]
    assert H.dtype == torch.float32
    X = seen["model.layers.0.self_attn.q_proj"][0].reshape(-1, 64).double()  # bf16 values, widened exactly
    torch.testing.assert_close(H.double(), X.T @ X, rtol=1e-5, atol=1e-4)


def test_out_of_memory_names_settings_and_keeps_finished_layers(monkeypatch):
    model = build("llama")
    ids, mask = batch(S=2, L=8)
    layer1 = model.model.layers[1]

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(layer1, "forward", boom)
    with pytest.raises(
        CalibrationOOMError, match=r"layer 1 .*seq_len 8, batch size 2.*--batch-size.*--device cpu"
    ) as ei:
        LayerRunner(model, device="cpu", progress=False).run(ids, mask, batch_size=2)
    assert ei.value.layers_done == 1
    done = ei.value.partial_stats.modules()
    assert done and all(m.startswith("model.layers.0.") for m in done)


def test_feed_compressed_uses_the_modified_layer():
    model = build("llama")
    ids, mask = batch(S=2, L=8)
    ref = LayerRunner(model, device="cpu", progress=False).run(ids, mask, batch_size=1)

    def compress(index, layer, stats):
        assert f"hessian/sum/model.layers.{index}.mlp.down_proj" in stats.tensors
        if index == 0:
            layer.mlp.down_proj.weight.mul_(0.5)

    st_first = LayerRunner(model, device="cpu", progress=False, on_layer=compress).run(ids, mask, batch_size=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    st_fed = LayerRunner(model, device="cpu", progress=False, on_layer=compress, feed_compressed=True).run(
        ids, mask, batch_size=1
    )
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)
    k1 = "hessian/sum/model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(st_first.tensors[k1], ref.tensors[k1])  # outputs from the first pass
    assert not torch.allclose(st_fed.tensors[k1], ref.tensors[k1])  # outputs of the compressed layer 0


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_kv_covariance_and_channel_norms_equal_direct_sums(arch):
    model = build(arch)
    ids, mask = batch(S=2, L=10, lengths=[10, 6])
    adapter = get_adapter(model)
    layer = adapter.layers[1]
    k_src, v_src = adapter.key_value_sources(layer)
    assert (k_src is layer.self_attn.k_norm) if arch == "qwen3" else (k_src is layer.self_attn.k_proj)
    got = {}
    hooks = [
        k_src.register_forward_hook(lambda m, a, o: got.setdefault("k", o)),
        v_src.register_forward_hook(lambda m, a, o: got.setdefault("v", o)),
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: got.setdefault("down", a[0])),
    ]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask.long())
    for h in hooks:
        h.remove()
    stats = LayerRunner(model, device="cpu", progress=False, observers=("kv", "norms")).run(ids, mask, batch_size=2)
    Hkv, d = adapter.num_kv_heads, adapter.head_dim
    for which in ("k", "v"):
        x = got[which][mask].reshape(-1, Hkv, d).double().transpose(0, 1)  # [Hkv, n, d]
        torch.testing.assert_close(
            stats.tensors[f"kv/{which}_outer/model.layers.1"], x.transpose(1, 2) @ x, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(stats.tensors[f"kv/{which}_sum/model.layers.1"], x.sum(1), rtol=1e-5, atol=1e-5)
        assert stats.counts[f"kv/{which}/model.layers.1"] == 16
    xd = got["down"][mask].double()
    torch.testing.assert_close(
        stats.tensors["norms/sumsq/model.layers.1.mlp.down_proj"], xd.square().sum(0), rtol=1e-5, atol=1e-7
    )
