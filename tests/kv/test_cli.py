"""``calibra kv calibrate`` / ``calibra kv eval`` on builtin:tiny-llama (small settings), and their errors."""
from __future__ import annotations

import json
import pytest

from calibra.cli import main

SMALL = ["--samples", "4", "--seq-len", "64", "--no-progress"]


def test_calibrate_then_eval(tmp_path, capsys):
    out = tmp_path / "kv_preset_tiny-llama.json"
    rc = main(["kv", "calibrate", "--input", "builtin:tiny-llama", "--rank", "32", "--targets", "kv",
               "--output", str(out), "--eval-max-tokens", "512", *SMALL])
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

    rc = main(["kv", "eval", "--input", "builtin:tiny-llama", "--preset", str(out), "--max-tokens", "512",
               "--rank", "16", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "K ranks      [16, 16, 16, 16]" in text and "ratio 0.25" in text


def test_no_compression_fits_exits_3_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["kv", "calibrate", "--input", "builtin:tiny-llama", "--target-kl", "0", "--output", str(out),
               "--tune-max-tokens", "128", "--no-eval", *SMALL])
    assert rc == 3
    text = capsys.readouterr().out
    assert "no compression fits the budget" in text and "V layer 3" in text
    assert not out.exists() and not out.with_suffix(".safetensors").exists()


def test_errors_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.head_dim \(64\)"):
        main(["kv", "calibrate", "--input", "builtin:tiny-llama", "--rank", "65", "--output",
              str(tmp_path / "p.json"), *SMALL])
    with pytest.raises(ValueError, match=r"must end in \.json"):
        main(["kv", "calibrate", "--input", "builtin:tiny-llama", "--rank", "8", "--output",
              str(tmp_path / "p.bin"), *SMALL])
    with pytest.raises(SystemExit):  # --rank and a budget are exclusive
        main(["kv", "calibrate", "--input", "builtin:tiny-llama", "--rank", "8", "--target-kl", "0.1",
              "--output", str(tmp_path / "p.json")])
    with pytest.raises(FileNotFoundError, match="no preset at"):
        main(["kv", "eval", "--input", "builtin:tiny-llama", "--preset", str(tmp_path / "none.json")])
