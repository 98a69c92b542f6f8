"""The structural adapter's discovery on tiny random models of transformers' own config classes: the
layer stack, the base, the Linear-like modules (GPT-2's transposed Conv1D included), what stays dense,
the final norm, shared-input groups in execution order, positional layer calls, and the refusals."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from calibra.calib.runner import LayerRunner  # noqa: E402
from calibra.models import check_supported, get_adapter, refusal  # noqa: E402
from calibra.models.linear import in_out, is_conv1d, store_weight, weight_view  # noqa: E402
from calibra.models.structural import StructuralAdapter  # noqa: E402
from tests.matrix.tiny_configs import tiny_model  # noqa: E402

from .run_one import replay_logits  # noqa: E402


@pytest.mark.parametrize(
    ("model_type", "stack", "base", "norm"),
    [
        ("gpt2", "transformer.h", "transformer", "ln_f"),
        ("opt", "model.decoder.layers", "model.decoder", "final_layer_norm"),
        ("gpt_neox", "gpt_neox.layers", "gpt_neox", "final_layer_norm"),
        ("gemma3", "model.language_model.layers", "model.language_model", "norm"),  # a vision-language model
    ],
)
def test_stack_base_and_final_norm_found(model_type, stack, base, norm):
    model = tiny_model(model_type)
    a = get_adapter(model)
    assert isinstance(a, StructuralAdapter)
    assert a.layers_prefix == stack and a.layers is model.get_submodule(stack)
    assert a.base is model.get_submodule(base)
    assert a.final_norm() is model.get_submodule(f"{base}.{norm}")
    assert all(p is not a.layers for p in a.pre_layer_modules())
    # nothing outside the language model's layers is ever a target (vision tower, projector, head)
    for i, layer in enumerate(a.layers):
        for name in a.linear_modules(layer):
            assert model.get_submodule(f"{a.layer_name(i)}.{name}") is not None


def test_explicit_families_keep_their_adapter():
    from calibra.models import ModelAdapter

    a = get_adapter(tiny_model("qwen3"))
    assert type(a) is ModelAdapter and a.explicit


def test_conv1d_weight_is_read_and_written_transposed():
    model = tiny_model("gpt2")
    a = get_adapter(model)
    mod = a.linear_modules(a.layers[0])["mlp.c_fc"]
    assert is_conv1d(mod)
    n_in, n_out = in_out(mod)
    assert (n_in, n_out) == (model.config.n_embd, model.config.n_inner or 4 * model.config.n_embd)
    w = weight_view(mod)
    assert w.shape == (n_out, n_in)
    x = torch.randn(3, n_in)
    assert torch.allclose(mod(x), x @ w.t() + mod.bias, atol=1e-5)  # [out, in] is what the module computes
    new = torch.randn(n_out, n_in)
    store_weight(mod, new)
    assert torch.equal(mod.weight, new.t())


def test_moe_experts_and_routers_are_not_plain_linears():
    """Routers stay dense; the fused experts are an MoE block (observed per expert: test_structural_moe.py)."""
    model = tiny_model("olmoe")
    a = get_adapter(model)
    layer = a.layers[0]
    dense = a.dense_linears(layer)
    lin = a.linear_modules(layer)
    assert any(r == "MoE router" for r in dense.values()) or not any("gate" == n.rsplit(".", 1)[-1] for n in lin)
    assert not any(".experts." in n for n in lin)
    assert {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"} <= set(lin)
    assert [b.name for b in a.moe_blocks(layer)] == ["mlp"]


def _groups(model_type: str) -> list[list[str]]:
    model = tiny_model(model_type)
    a = get_adapter(model)
    seen = []

    def on_layer(i, layer, stats):
        if i == 0:
            seen.extend(runner.input_groups(i, layer))

    runner = LayerRunner(model, a, device="cpu", observers=(), on_layer=on_layer, progress=False)
    runner.run(torch.randint(3, 200, (2, 8)))
    pre = a.layer_name(0) + "."
    return [[k[len(pre) :] for k in g] for g in seen]


def test_shared_inputs_grouped_in_execution_order():
    # phi: q/k/v read one normed input; the MLP reads the same normed input too (parallel block), then
    # dense and fc2 read their own inputs
    groups = _groups("phi")
    flat = [k for g in groups for k in g]
    assert sorted(flat) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"]
    )
    qkv = next(g for g in groups if "self_attn.q_proj" in g)
    assert {"self_attn.k_proj", "self_attn.v_proj"} <= set(qkv)
    assert flat.index("self_attn.q_proj") < flat.index("self_attn.dense")
    assert flat.index("mlp.fc1") < flat.index("mlp.fc2")
    # gemma: q/k/v one group, o alone, gate/up one group, down alone -- found by tensor identity
    assert _groups("gemma") == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


@pytest.mark.parametrize("model_type", ["gpt2", "bloom", "gemma3_text", "falcon"])
def test_layer_by_layer_replay_equals_the_model(model_type):
    # gpt2 calls its blocks with positional arguments; bloom passes ALiBi; gemma3 sliding/full masks
    model = tiny_model(model_type)
    ids = torch.randint(3, 200, (2, 10))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    got = replay_logits(model, get_adapter(model), ids)
    assert got is not None
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_no_final_norm_raises_and_streamed_eval_refuses_before_reading():
    from calibra.eval.streamed import StreamedLM

    model = tiny_model("bart")  # the decoder's final layer_norm is named like no other family's
    a = get_adapter(model)
    with pytest.raises(NotImplementedError, match="not a single norm"):
        a.final_norm()

    class NoReads:
        model = None

        def load(self, *a, **k):  # pragma: no cover - must not be reached
            raise AssertionError("a weight was read")

    streamed = NoReads()
    streamed.model = model
    with pytest.raises(NotImplementedError, match="evaluate the model loaded whole"):
        StreamedLM(streamed)


@pytest.mark.parametrize(
    ("model_type", "config", "reason"),
    [
        ("t5", None, "not a causal language model"),
        ("bart", {"is_encoder_decoder": True}, "encoder-decoder"),
        ("bert", {"is_decoder": False}, "bidirectional encoder"),
        ("xlnet", None, "two hidden streams"),
    ],
)
def test_refusals_name_their_reason_from_the_config(model_type, config, reason):
    assert reason in refusal(model_type, config)
    with pytest.raises(ValueError, match=f"unsupported architecture model_type='{model_type}'.*{reason}"):
        check_supported(model_type, config)


def test_unknown_stack_is_refused_structurally():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_model("llama").config
            self.config.model_type = "gpt2"  # accepted by name; the structure decides
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(TypeError, match="no decoder layer stack"):
        get_adapter(Flat())


def test_engine_formats_refuse_conv1d_before_weights():
    from calibra.export import precheck
    from calibra.export.writer import ExportError

    with pytest.raises(ExportError, match="Conv1D"):
        name = "transformer.h.0.mlp.c_fc"
        precheck("compressed-tensors", [name], rotated=False, transposed=[name])
    assert precheck("dense", ["x"], rotated=False, transposed=["x"]) == ["dense"]


def test_smoothing_only_for_explicit_adapters():
    from calibra.quant.act_ranges import smoothing_groups

    model = tiny_model("gemma")  # (1 + w) RMSNorm: dividing w by s would not divide the norm's output
    a = get_adapter(model)
    assert smoothing_groups(a, 0, a.layers[0]) == []
    llama = tiny_model("llama")
    la = get_adapter(llama)
    assert len(smoothing_groups(la, 0, la.layers[0])) == 2


class _Block(torch.nn.Module):
    def __init__(self, tuple_out: bool):
        super().__init__()
        self.fc, self.tuple_out = torch.nn.Linear(8, 8), tuple_out

    def forward(self, h, attention_mask=None):
        h = h + self.fc(h)
        return (h, None) if self.tuple_out else h


class _Base(torch.nn.Module):
    """A decoder stack with a configurable call convention (what the capture must cope with)."""

    def __init__(self, unpack: bool, rescale: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.layers = torch.nn.ModuleList(_Block(unpack) for _ in range(2))
        self.norm = torch.nn.LayerNorm(8)
        self.unpack, self.rescale = unpack, rescale

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            if self.unpack:
                h, _ = layer(h, attention_mask=attention_mask)  # needs a 2-tuple from the stub
            else:
                h = layer(h, attention_mask=attention_mask)
            if self.rescale:
                h = h * 2  # between layers: a layer-by-layer replay would miss it
        return self.norm(h)


class _Toy(torch.nn.Module):
    def __init__(self, unpack=False, rescale=False):
        super().__init__()
        from transformers import GPT2Config

        self.config = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=32)
        self.model = _Base(unpack, rescale)
        self.lm_head = torch.nn.Linear(8, 32)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None):
        return self.lm_head(self.model(input_ids, attention_mask))


@pytest.mark.parametrize("unpack", [False, True])
def test_capture_finds_the_layer_output_shape(unpack):
    toy = _Toy(unpack=unpack).eval()
    ids = torch.randint(0, 32, (2, 6))
    a = get_adapter(toy)
    assert a.layers_prefix == "model.layers" and a.final_norm() is toy.model.norm
    with torch.no_grad():
        ref = toy(ids)
    assert torch.allclose(replay_logits(toy, a, ids), ref, atol=1e-5)


def test_hidden_states_changed_between_layers_is_refused():
    toy = _Toy(rescale=True).eval()
    with pytest.raises(TypeError, match="does not pass each decoder layer's output unchanged"):
        replay_logits(toy, get_adapter(toy), torch.randint(0, 32, (2, 6)))


def test_kv_calibration_refuses_a_structural_family_before_reading_weights(tmp_path, monkeypatch):
    import calibra.assets
    import calibra.kv
    from calibra.kv.plan import KVArchitectureError

    tiny_model("gpt2").save_pretrained(tmp_path)

    def no_load(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(calibra.assets, "load_model", no_load)
    with pytest.raises(KVArchitectureError, match="model_type='gpt2' has no explicit adapter"):
        calibra.kv.calibrate(str(tmp_path), rank=4)
