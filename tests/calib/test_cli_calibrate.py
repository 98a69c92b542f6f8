"""``calibra calibrate`` end to end: a local tiny Llama folder, and builtin:tiny-moe when it is installed."""

from __future__ import annotations

import pytest
import torch

from calibra.calib import CalibrationStats
from calibra.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from calibra.assets import builtin_texts

    folder = tmp_path_factory.mktemp("tiny-llama-local")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        builtin_texts("code")[:40],
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_cli_calibrate_local_folder(tiny_llama_folder, tmp_path, capsys):
    out = tmp_path / "stats.safetensors"
    rc = main(
        [
            "calibrate",
            "--input",
            str(tiny_llama_folder),
            "--output",
            str(out),
            "--samples",
            "6",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--observers",
            "hessian,norms",
            "--hessian-dtype",
            "float64",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "calibrated" in text and "192 tokens" in text
    st = CalibrationStats.load(out)
    assert st.metadata["hessian_dtype"] == "float64" and st.metadata["observers"] == ["hessian", "norms"]
    assert st.metadata["runs"][0]["dataset"] == "builtin" and st.metadata["runs"][0]["seed"] == 0
    assert len(st.modules("hessian")) == 2 * 7 and st.token_count == 6 * 32
    for m in st.modules("hessian"):
        H = st.hessian(m)
        assert torch.isfinite(H).all() and st.count("hessian", m) == 192
    # the same seed gives the same statistics bit for bit
    out2 = tmp_path / "again.safetensors"
    main(
        [
            "calibrate",
            "--input",
            str(tiny_llama_folder),
            "--output",
            str(out2),
            "--samples",
            "6",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--observers",
            "hessian,norms",
            "--hessian-dtype",
            "float64",
            "--no-progress",
        ]
    )
    again = CalibrationStats.load(out2)
    assert all(torch.equal(again.tensors[k], v) for k, v in st.tensors.items())


def test_cli_refuses_unsupported_architecture_before_loading(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ValueError, match=r"unsupported architecture.*supported: llama"):
        main(["calibrate", "--input", str(tmp_path), "--output", str(tmp_path / "s.safetensors")])
    assert not (tmp_path / "s.safetensors").exists()


def test_cli_calibrate_builtin_tiny_moe(tmp_path, capsys):
    from calibra.assets import ASSETS_DIR

    if not (ASSETS_DIR / "models" / "tiny-moe" / "config.json").is_file():
        pytest.skip("builtin:tiny-moe is not installed in this checkout")
    out = tmp_path / "moe.safetensors"
    # A small run: speed is measured by the README's command, not asserted in a test.
    assert (
        main(
            [
                "calibrate",
                "--input",
                "builtin:tiny-moe",
                "--output",
                str(out),
                "--no-progress",
                "--samples",
                "16",
                "--seq-len",
                "256",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "MoE coverage" in text
    st = CalibrationStats.load(out)
    for row in st.metadata["moe"]["coverage"]:
        for proj in ("gate_up_proj", "down_proj"):
            assert torch.isfinite(st.hessian(f"{row['block']}.experts.{row['expert']}.{proj}")).all()
