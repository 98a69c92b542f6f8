"""Fixtures of the streamed MoE tests (quantize and prune): the MoE checkpoints a streamed job reads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch


@pytest.fixture(scope="session")
def qwen3_moe(tmp_path_factory):
    """A tiny Qwen3-MoE saved by ``save_pretrained`` (bf16, six shards): layer 0 a dense MLP, layers 1-2
    four experts each."""
    transformers = pytest.importorskip("transformers")
    from calibra.assets import ASSETS_DIR

    folder = tmp_path_factory.mktemp("qwen3-moe")
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=128,
        moe_intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():  # a router that spreads the tokens (its default init is near zero)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder, max_shard_size="400KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS_DIR / "models" / "tiny-moe" / f, folder / f)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    assert (
        "model.layers.1.mlp.experts.3.gate_proj.weight"
        in json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    )
    return folder


@pytest.fixture(params=["tiny-moe", "qwen3-moe"])
def moe_folder(request):
    if request.param == "tiny-moe":
        from calibra.assets import resolve_model

        return resolve_model("builtin:tiny-moe")
    return request.getfixturevalue("qwen3_moe")


@pytest.fixture
def interrupt_after_layer(monkeypatch):
    """``interrupt_after_layer(job, layer=1)``: runs ``job()`` with a KeyboardInterrupt raised right after layer
    ``layer``'s checkpoint is committed (as a Ctrl-C between layers), asserts the job stopped there, and puts
    the real ``save_layer`` back for the resume that follows."""
    from calibra.io import checkpoint

    real = checkpoint.LayerCheckpoints.save_layer

    def run(job, layer: int = 1) -> None:
        def interrupted(self, i, *a, **k):
            real(self, i, *a, **k)
            if i == layer:
                raise KeyboardInterrupt

        monkeypatch.setattr(checkpoint.LayerCheckpoints, "save_layer", interrupted)
        try:
            with pytest.raises(KeyboardInterrupt):
                job()
        finally:
            monkeypatch.setattr(checkpoint.LayerCheckpoints, "save_layer", real)

    return run
