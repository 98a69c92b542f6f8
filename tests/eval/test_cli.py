"""`calibra eval` end to end on locally saved tiny models: same numbers as the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import calibra
from calibra.cli import main
from tests.eval.tiny import perturbed

# the folder calibra was imported from (the source tree, or site-packages when testing a wheel)
PKG_PARENT = Path(calibra.__file__).resolve().parents[1]
ARGS = ["--seq-len", "64", "--stride", "32", "--max-tokens", "500", "--device", "cpu"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, llama, tokenizer):
    root = tmp_path_factory.mktemp("models")
    ref, cmp_dir = root / "ref", root / "cmp"
    llama.save_pretrained(ref)
    tokenizer.save_pretrained(ref)
    perturbed(llama, 0.2, layers=[1]).save_pretrained(cmp_dir)
    tokenizer.save_pretrained(cmp_dir)
    return ref, cmp_dir


def test_cli_perplexity_equals_api(saved, tmp_path, capsys):
    ref, _ = saved
    out = tmp_path / "ppl.json"
    assert main(["eval", "--model", str(ref), "--json", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    api = calibra.evaluate(str(ref), seq_len=64, stride=32, max_tokens=500, device="cpu")
    assert got["ppl"] == api.ppl and got["tokens"] == api.tokens == 499
    assert got["metric"] == "perplexity" and got["model"] == str(ref)
    assert "seq_len 64, stride 32" in printed and "builtin:eval" in printed and f"{api.ppl:.4f}" in printed
    assert not (tmp_path / "ppl.json.tmp").exists()


def test_cli_kl_with_attribution_equals_api(saved, tmp_path, capsys):
    ref, cmp_dir = saved
    out = tmp_path / "kl.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(cmp_dir),
                "--reference",
                str(ref),
                "--metric",
                "kl-divergence",
                "--top-k",
                "32",
                "--attribution",
                "--json",
                str(out),
                *ARGS,
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    got = json.loads(out.read_text())
    api = calibra.evaluate(
        str(cmp_dir),
        reference=str(ref),
        metric="kl-divergence",
        top_k=32,
        attribution=True,
        seq_len=64,
        stride=32,
        max_tokens=500,
        device="cpu",
    )
    assert got["kl_ref_cmp"] == api.kl_ref_cmp and got["kl_cmp_ref"] == api.kl_cmp_ref
    assert got["top_k"] == 32 and got["reference"] == str(ref)
    assert got["attribution"]["layers"][0]["layer"] == 1
    assert "KL(ref||model)" in printed and "KL(model||ref)" in printed and "model.layers.1" in printed


def test_cli_refuses_bad_arguments_before_loading(capsys):
    with pytest.raises(ValueError, match="needs a reference"):
        main(["eval", "--model", "no/such/folder", "--metric", "kl-divergence"])
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x", "--metric", "bleu"])


def test_python_dash_m_calibra_eval(saved, tmp_path):
    """The installed entry point path: a fresh interpreter, same number as the API."""
    ref, _ = saved
    out = tmp_path / "sub.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PKG_PARENT), os.environ.get("PYTHONPATH", "")]))
    subprocess.run(
        [sys.executable, "-m", "calibra", "eval", "--model", str(ref), "--json", str(out), *ARGS],
        check=True,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    api = calibra.evaluate(str(ref), seq_len=64, stride=32, max_tokens=500, device="cpu")
    assert json.loads(out.read_text())["ppl"] == pytest.approx(api.ppl, rel=1e-6)
