"""``calibra quantize --input <folder>`` end to end on a family without an explicit adapter (Phi, saved with
``save_pretrained``): the CLI quantizes it, writes calibra's folder, and the folder rebuilds into a model
whose quantized Linears hold the codes and whose logits stay close to the original's."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from calibra.cli import main  # noqa: E402
from calibra.quant.save import load  # noqa: E402
from tests.matrix.run_one import _tokenizer  # noqa: E402
from tests.matrix.tiny_configs import tiny_model  # noqa: E402


def test_cli_quantizes_a_structural_family_folder(tmp_path):
    model = tiny_model("phi")
    folder, out = tmp_path / "phi", tmp_path / "phi-q"
    model.save_pretrained(folder)
    _tokenizer(model.config.vocab_size).save_pretrained(folder)
    args = ["--method", "gptq", "--group-size", "16", "--samples", "4", "--seq-len", "16", "--no-eval"]
    assert main(["quantize", "--input", str(folder), "--output", str(out), *args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["adapter"] == "structural" and report["model"]["layer_stack"] == "model.layers"
    rebuilt, manifest = load(out)
    modules = manifest["modules"]
    per_layer = {n.split(".")[2] for n in modules}
    assert per_layer == {str(i) for i in range(model.config.num_hidden_layers)}
    assert "model.layers.0.self_attn.q_proj" in modules and "model.layers.0.mlp.fc2" in modules
    assert not any("lm_head" in n or "embed" in n for n in modules)  # head and embeddings stay dense
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, rebuilt(input_ids=ids).logits
    assert torch.isfinite(got).all()
    assert not torch.equal(got, ref)
    assert float((got - ref).norm() / ref.norm()) < 0.5


def test_quantized_gpt2_folder_streams_like_the_whole_model(tmp_path):
    """GPT-2's Conv1D weights ([in, out]) dequantized layer by layer by the streamed reader: the same
    perplexity as the folder loaded whole."""
    import math

    import calibra
    from calibra.quant import RTNConfig

    model = tiny_model("gpt2")
    folder, out = tmp_path / "gpt2", tmp_path / "gpt2-q"
    model.save_pretrained(folder)
    _tokenizer(model.config.vocab_size).save_pretrained(folder)
    calibra.quantize(
        str(folder), RTNConfig(bits=4, group_size=16), output=out, evaluate=False, progress=False, echo=None
    )
    protocol = dict(max_tokens=512, seq_len=64, progress=False)
    whole = calibra.evaluate(str(out), stream=False, **protocol)
    layered = calibra.evaluate(str(out), stream=True, **protocol)
    assert layered.tokens == whole.tokens
    assert math.isclose(layered.ppl, whole.ppl, rel_tol=1e-4), (layered.ppl, whole.ppl)


def test_prune_a_structural_family_with_conv1d(tmp_path):
    """SparseGPT 2:4 on GPT-2: the pattern holds along each Conv1D's input dimension (its weight's rows)."""
    import calibra
    from calibra.data import CalibrationConfig
    from calibra.models import get_adapter
    from calibra.models.linear import weight_view
    from calibra.prune import PruningConfig

    model = tiny_model("gpt2")
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    _tokenizer(model.config.vocab_size).save_pretrained(folder)
    pruned, _ = calibra.prune(
        str(folder),
        PruningConfig(method="sparsegpt", pattern="2:4"),
        CalibrationConfig(num_samples=2, sequence_length=16),
        progress=False,
        echo=None,
        device="cpu",
    )
    a = get_adapter(pruned)
    for layer in a.layers:
        for name, mod in a.linear_modules(layer).items():
            w = weight_view(mod)  # [out, in]
            nz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
            assert bool((nz <= 2).all()), name
