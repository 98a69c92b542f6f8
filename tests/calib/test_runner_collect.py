"""On-demand collection inside on_layer: shared Hessians, restricted collections that stop the forward
early, and frozen modules whose outputs are replayed -- each exactly equal to the plain full passes."""

from __future__ import annotations

import pytest
import torch

from calibra.calib import LayerRunner
from calibra.models import get_adapter
from calibra.quant import GPTQConfig
from calibra.quant.apply import LayerQuantizer
from tests.calib._tiny import ARCHS, batch, build

pytest.importorskip("transformers")

L0 = "model.layers.0"


def _hessian(stats, key):
    return stats.tensors[f"hessian/sum/{key}"]


def _count_calls(modules: dict) -> tuple[dict, list]:
    calls = {n: 0 for n in modules}

    def bump(n):
        def hook(m, a):
            calls[n] += 1

        return hook

    return calls, [m.register_forward_pre_hook(bump(n)) for n, m in modules.items()]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_modules_reading_one_input_share_one_exact_hessian(arch):
    model = build(arch)
    ids, mask = batch(S=3, L=12, lengths=[12, 7, 12])
    seen = {}
    layer = model.model.layers[1]
    hooks = [
        layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("attn", []).append(a[0])),
        layer.mlp.up_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("mlp", []).append(a[0])),
    ]
    st = LayerRunner(model, device="cpu", progress=False).run(ids, mask, batch_size=2)
    for h in hooks:
        h.remove()
    L1 = "model.layers.1"
    q, k, v = (_hessian(st, f"{L1}.self_attn.{n}_proj") for n in "qkv")
    assert q is k and k is v  # one accumulation, one tensor
    assert _hessian(st, f"{L1}.mlp.gate_proj") is _hessian(st, f"{L1}.mlp.up_proj")
    assert _hessian(st, f"{L1}.self_attn.o_proj") is not q
    assert st.count("hessian", f"{L1}.self_attn.k_proj") == st.count("hessian", f"{L1}.self_attn.q_proj") == 31
    for key, rows in (("attn", q), ("mlp", _hessian(st, f"{L1}.mlp.up_proj"))):
        x = torch.cat([t[m] for t, m in zip(seen[key], (mask[:2], mask[2:]))]).double()
        torch.testing.assert_close(rows.double(), x.T @ x, rtol=1e-5, atol=1e-4)


def test_saved_statistics_keep_every_shared_hessian(tmp_path):
    from calibra.calib.stats import CalibrationStats

    model = build("llama")
    ids, mask = batch(S=2, L=8)
    st = LayerRunner(model, device="cpu", progress=False).run(ids, mask)
    back = CalibrationStats.load(st.save(tmp_path / "s.safetensors"))
    for n in "qkv":
        torch.testing.assert_close(_hessian(back, f"{L0}.self_attn.{n}_proj"), _hessian(st, f"{L0}.self_attn.q_proj"))


def test_restricted_collection_stops_at_the_last_requested_module():
    model = build("llama")
    ids, mask = batch(S=4, L=10, lengths=[10, 10, 6, 10])
    full = LayerRunner(model, device="cpu", progress=False).run(ids, mask, batch_size=2)
    layer0 = model.model.layers[0]
    calls, hooks = _count_calls(
        {"o": layer0.self_attn.o_proj, "gate": layer0.mlp.gate_proj, "down": layer0.mlp.down_proj}
    )
    got = {}

    def on_layer(i, layer, stats):
        if i != 0:
            return
        assert not any(L0 in k for k in stats.tensors)  # on demand: nothing collected before on_layer
        st = runner.collect(i, layer, [f"{L0}.self_attn.{n}_proj" for n in "qkv"])
        got["qkv"] = _hessian(st, f"{L0}.self_attn.v_proj").clone()
        got["calls_qkv"] = dict(calls)
        st = runner.collect(i, layer, [f"{L0}.mlp.gate_proj", f"{L0}.mlp.up_proj"])
        got["gate"] = _hessian(st, f"{L0}.mlp.gate_proj").clone()
        got["calls_gate"] = dict(calls)
        assert f"hessian/sum/{L0}.mlp.down_proj" not in st.tensors
        st = runner.collect(i, layer, [f"{L0}.mlp.down_proj"])
        got["down"] = _hessian(st, f"{L0}.mlp.down_proj").clone()
        got["calls_down"] = dict(calls)
        st = runner.collect(i, layer, [f"{L0}.mlp.down_proj"])  # again: replaced, not added
        assert st.count("hessian", f"{L0}.mlp.down_proj") == int(mask.sum())

    runner = LayerRunner(
        model, device="cpu", progress=False, on_layer=on_layer, feed_compressed=True, collect_on_demand=True
    )
    runner.run(ids, mask, batch_size=2)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got["qkv"], _hessian(full, f"{L0}.self_attn.v_proj"))
    torch.testing.assert_close(got["gate"], _hessian(full, f"{L0}.mlp.gate_proj"))
    torch.testing.assert_close(got["down"], _hessian(full, f"{L0}.mlp.down_proj"))
    assert got["calls_qkv"] == {"o": 0, "gate": 0, "down": 0}  # stopped before the attention ran
    assert got["calls_gate"] == {"o": 2, "gate": 2, "down": 0}  # 2 batches; stopped at gate_proj
    assert got["calls_down"] == {"o": 4, "gate": 4, "down": 2}  # down_proj's hook fired, then the stop
    with pytest.raises(ValueError, match="collect_on_demand"):
        LayerRunner(model, device="cpu", progress=False, collect_on_demand=True)
    with pytest.raises(RuntimeError, match="outside on_layer"):
        runner.collect(0, layer0, [f"{L0}.mlp.down_proj"])


def test_a_collection_pass_whose_outputs_are_dropped_stops_at_the_last_hooked_module():
    """feed_compressed without on-demand collection (GPTQ --no-true-sequential, pruning): the first pass
    only feeds statistics, so down_proj's matmul never runs in it -- only in the pass producing outputs."""
    model = build("llama")
    ids, mask = batch(S=4, L=10)
    layer0 = model.model.layers[0]
    calls = {"down": 0}  # a forward hook: counts only the matmuls that completed
    hooks = [layer0.mlp.down_proj.register_forward_hook(lambda m, a, o: calls.__setitem__("down", calls["down"] + 1))]
    seen = {}

    def on_layer(i, layer, stats):
        if i == 0:
            seen["down_calls"] = calls["down"]
            seen["down_hessian"] = f"hessian/sum/{L0}.mlp.down_proj" in stats.tensors

    full = LayerRunner(model, device="cpu", progress=False).run(ids, mask, batch_size=2)
    calls["down"] = 0
    st = LayerRunner(model, device="cpu", progress=False, on_layer=on_layer, feed_compressed=True).run(
        ids, mask, batch_size=2
    )
    for h in hooks:
        h.remove()
    # down_proj's input was observed (its Hessian is there), then the pass stopped before its matmul ran
    assert seen == {"down_calls": 0, "down_hessian": True}
    assert calls["down"] == 2  # the output pass's 2 batches
    for k in full.tensors:
        torch.testing.assert_close(st.tensors[k], full.tensors[k])


def test_frozen_attention_is_replayed_and_the_layer_outputs_are_unchanged():
    ids, mask = batch(S=3, L=9, lengths=[9, 5, 9])

    def run(freeze: bool):
        model = build("llama")
        adapter = get_adapter(model)
        outs = {}

        def on_layer(i, layer, stats):
            runner.collect(i, layer, [f"model.layers.{i}.self_attn.o_proj"])
            with torch.no_grad():
                layer.self_attn.o_proj.weight.mul_(0.75)  # "quantize" o_proj
            if freeze:
                runner.freeze(i, adapter.attention(layer))
            runner.collect(i, layer, [f"model.layers.{i}.mlp.gate_proj"])
            runner.collect(i, layer, [f"model.layers.{i}.mlp.down_proj"])
            with torch.no_grad():
                layer.mlp.down_proj.weight.mul_(0.5)

        # q_proj runs only when the attention is computed (a replay skips the whole block)
        sdpa_calls, hooks = _count_calls({i: l.self_attn.q_proj for i, l in enumerate(model.model.layers)})
        runner = LayerRunner(
            model,
            adapter,
            device="cpu",
            progress=False,
            on_layer=on_layer,
            feed_compressed=True,
            collect_on_demand=True,
        )
        st = runner.run(ids, mask, batch_size=2, after_layer=lambda i, h: outs.__setitem__(i, [t.clone() for t in h]))
        for h in hooks:
            h.remove()
        assert not any("forward" in vars(l.self_attn) for l in model.model.layers)  # replays removed
        return outs, st, sdpa_calls

    outs_f, st_f, calls_f = run(True)
    outs_p, st_p, calls_p = run(False)
    for i in outs_p:
        for a, b in zip(outs_f[i], outs_p[i]):
            assert torch.equal(a, b)
    for k in ("hessian/sum/model.layers.1.mlp.down_proj", "hessian/sum/model.layers.1.self_attn.o_proj"):
        assert torch.equal(st_f.tensors[k], st_p.tensors[k])
    # per layer and batch: o collection, gate collection (recorded), then replays for down and the outputs
    assert calls_p == {0: 8, 1: 8} and calls_f == {0: 4, 1: 4}


@pytest.mark.parametrize("arch", ARCHS)
def test_on_demand_true_sequential_gptq_equals_full_recollection(arch):
    """The staged collections (restricted, early-stopped, shared, replayed) give bit-identical codes to
    re-collecting every statistic with full passes before each group."""
    ids, mask = batch(S=4, L=12, lengths=[12, 8, 12, 12])
    cfg = GPTQConfig(bits=4, group_size=16, true_sequential=True)

    def quantize(on_demand: bool):
        model = build(arch)
        adapter = get_adapter(model)
        q = LayerQuantizer(cfg, adapter)
        runner = LayerRunner(
            model, adapter, device="cpu", progress=False, on_layer=q, feed_compressed=True, collect_on_demand=on_demand
        )
        if on_demand:
            q.collect, q.freeze = runner.collect, runner.freeze
        else:
            q.collect = lambda i, layer, keys: runner.recollect(i, layer)
        runner.run(ids, mask, batch_size=2)
        return q.layers

    staged, full = quantize(True), quantize(False)
    assert set(staged) == set(full) and len(staged) > 0
    for name in full:
        assert torch.equal(staged[name].codes, full[name].codes), name
        assert torch.equal(staged[name].scales, full[name].scales), name
