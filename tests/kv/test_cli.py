"""``calibra kv calibrate`` / ``calibra kv eval`` on builtin:tiny-llama (small settings), and their errors."""

from __future__ import annotations

import json

import pytest

from calibra.cli import main

SMALL = ["--samples", "4", "--seq-len", "64", "--no-progress"]


def test_calibrate_then_eval(tmp_path, capsys):
    out = tmp_path / "kv_preset_tiny-llama.json"
    rc = main(
        [
            "kv",
            "calibrate",
            "--input",
            "builtin:tiny-llama",
            "--rank",
            "32",
            "--targets",
            "kv",
            "--output",
            str(out),
            "--eval-max-tokens",
            "512",
            *SMALL,
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "cache bytes" in text
    meta = json.loads(out.read_text())
    assert meta["model"]["source"] == "builtin:tiny-llama" and meta["model"]["attention"] == "gqa"
    assert meta["ranks"] == {"k": [32] * 4, "v": [32] * 4}
    assert meta["calibration"]["samples"] == 4 and meta["calibration"]["sequence_length"] == 64
    assert meta["calibration"]["dataset"] == "builtin" and meta["calibration"]["seed"] == 0
    q = meta["quality"]
    assert q["protocol"]["seq_len"] == 256 and q["protocol"]["tokens_scored"] > 0  # the trained length
    assert q["memory"]["v_ratio"] == 0.5 and 0.5 < q["memory"]["ratio"] < 0.51  # K: + int32 positions
    assert q["perplexity"]["baseline"] > 1 and q["kl_divergence"]["mean"] >= 0

    rc = main(
        [
            "kv",
            "eval",
            "--input",
            "builtin:tiny-llama",
            "--preset",
            str(out),
            "--max-tokens",
            "512",
            "--rank",
            "16",
            "--no-progress",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "K ranks      [16, 16, 16, 16]" in text and "ratio 0.25" in text


def test_no_compression_fits_exits_3_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(
        [
            "kv",
            "calibrate",
            "--input",
            "builtin:tiny-llama",
            "--target-kl",
            "0",
            "--output",
            str(out),
            "--tune-max-tokens",
            "128",
            "--no-eval",
            *SMALL,
        ]
    )
    assert rc == 3
    text = capsys.readouterr().out
    assert "no compression fits the budget" in text and "V layer 3" in text
    assert not out.exists() and not out.with_suffix(".safetensors").exists()


def test_errors_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.head_dim \(64\)"):
        main(
            [
                "kv",
                "calibrate",
                "--input",
                "builtin:tiny-llama",
                "--rank",
                "65",
                "--output",
                str(tmp_path / "p.json"),
                *SMALL,
            ]
        )
    with pytest.raises(ValueError, match=r"must end in \.json"):
        main(
            [
                "kv",
                "calibrate",
                "--input",
                "builtin:tiny-llama",
                "--rank",
                "8",
                "--output",
                str(tmp_path / "p.bin"),
                *SMALL,
            ]
        )
    with pytest.raises(SystemExit):  # --rank and a budget are exclusive
        main(
            [
                "kv",
                "calibrate",
                "--input",
                "builtin:tiny-llama",
                "--rank",
                "8",
                "--target-kl",
                "0.1",
                "--output",
                str(tmp_path / "p.json"),
            ]
        )
    with pytest.raises(FileNotFoundError, match="no preset at"):
        main(["kv", "eval", "--input", "builtin:tiny-llama", "--preset", str(tmp_path / "none.json")])


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if a model's weights are read: every setting must be checked before."""
    import calibra.kv.api as kv_api

    def refuse(*a, **k):
        raise AssertionError("the model's weights were read before the settings were checked")

    monkeypatch.setattr(kv_api, "_load", refuse)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seq-len", "512"], r"sequence_length 512 exceeds the model's 256 positions"),
        (
            ["--eval-seq-len", "1024"],
            r"seq_len 1024 exceeds the model's max_position_embeddings 256; pass --eval-seq-len 256",
        ),
        (["--samples", "0"], r"num_samples must be an int >= 1"),
        (["--batch-size", "4", "--samples", "2"], r"batch_size 4 is larger than num_samples 2"),
    ],
)
def test_length_settings_checked_before_weights_are_read(tmp_path, no_weights, flags, message):
    with pytest.raises(ValueError, match=message):
        main(
            [
                "kv",
                "calibrate",
                "--input",
                "builtin:tiny-llama",
                "--rank",
                "8",
                "--output",
                str(tmp_path / "p.json"),
                *flags,
            ]
        )
    assert not (tmp_path / "p.json").exists()


def test_eval_seq_len_checked_before_weights_are_read(tmp_path, no_weights):
    from calibra.kv import evaluate
    from calibra.kv.plan import KVPlan
    from calibra.kv.preset import KVPreset

    preset = KVPreset.__new__(KVPreset)  # never read: the length check comes first
    preset.plan = KVPlan.__new__(KVPlan)
    with pytest.raises(
        ValueError, match=r"seq_len 300 exceeds the model's max_position_embeddings 256; pass --seq-len 256"
    ):
        evaluate("builtin:tiny-llama", preset, seq_len=300)


def test_calibration_defaults_follow_the_model():
    """kv calibrate's calibration defaults are the other verbs' (capped by the model, auto batch)."""
    import argparse

    from calibra.kv.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["kv", "calibrate", "--input", "builtin:tiny-llama", "--rank", "8", "--output", "p.json"])
    assert args.seq_len is None and args.batch_size is None
