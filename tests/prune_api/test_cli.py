"""`calibra prune`: thin over the API; every option documents its default; summary table; builtin models."""

from __future__ import annotations

import json
import re

import pytest
import torch

from calibra import assets
from calibra.cli import build_parser, main
from tests.prune_api._helpers import REPORT_KEYS, read_report, saved_tensors

SMALL = ["--samples", "4", "--seq-len", "32", "--no-progress", "--device", "cpu"]


def test_help_documents_every_option_with_default():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    p = sub.choices["prune"]
    helptext = p.format_help()
    for action in p._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        if action.option_strings and not isinstance(action.default, bool) and action.default is not None:
            assert f"(default: {action.default})" in " ".join(helptext.split()), action.dest
    for opt in ("--method", "--sparsity", "--pattern", "--bits", "--group-size", "--save-24", "--overwrite"):
        assert opt in helptext


@pytest.mark.parametrize(
    "argv,method,pattern",
    [
        (["--method", "magnitude", "--sparsity", "0.5"], "magnitude", "unstructured"),
        (["--method", "wanda", "--pattern", "2:4", "--save-24"], "wanda", "2:4"),
        (["--method", "sparsegpt", "--pattern", "4:8", "--bits", "4", "--group-size", "32"], "sparsegpt", "4:8"),
    ],
)
def test_cli_runs_and_writes_report(llama_dir, tmp_path, capsys, argv, method, pattern):
    out = tmp_path / "out"
    rc = main(["prune", "--input", str(llama_dir), "--output", str(out), *argv, *SMALL])
    assert rc == 0
    rep = read_report(out)
    assert REPORT_KEYS <= set(rep) and rep["settings"]["method"] == method and rep["settings"]["pattern"] == pattern
    assert "eval" not in rep  # local folders: evaluation off unless --eval
    saved = saved_tensors(out)
    for row in rep["modules"]:
        w = saved[f"{row['module']}.weight"]
        assert row["zero_fraction"] == int((w == 0).sum()) / w.numel()
        if "--bits" in argv:  # joint quantization may round kept weights to the zero point as well
            assert row["zero_fraction"] >= row["achieved_sparsity"] == 0.5
        else:
            assert row["achieved_sparsity"] == row["zero_fraction"]
    assert (out / "sparse24.safetensors").is_file() == ("--save-24" in argv)
    text = capsys.readouterr().out
    assert f"calibra prune: {llama_dir} with {method} ({pattern}" in text
    assert re.search(r"sparsity\s+target 0\.5000, achieved 0\.5000", text)
    if "--bits" in argv:
        assert "W4 g32" in text and rep["settings"]["joint_quantization"]["bits"] == 4


def test_cli_eval_summary(llama_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    main(
        [
            "prune",
            "--input",
            str(llama_dir),
            "--output",
            str(out),
            "--method",
            "wanda",
            "--eval",
            "--eval-max-tokens",
            "200",
            "--eval-seq-len",
            "64",
            *SMALL,
        ]
    )
    text = capsys.readouterr().out
    assert re.search(r"perplexity\s+[\d.]+ -> [\d.]+ \([+-][\d.]+%\)", text)
    assert "KL(dense||pruned)" in text
    ev = read_report(out)["eval"]
    assert ev["protocol"]["stream_tokens"] == 200


def test_cli_bad_input_writes_nothing(llama_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="target_sparsity"):
        main(
            ["prune", "--input", str(llama_dir), "--output", str(out), "--method", "wanda", "--sparsity", "1.5", *SMALL]
        )
    with pytest.raises(ValueError, match="fixes the sparsity"):
        main(
            [
                "prune",
                "--input",
                str(llama_dir),
                "--output",
                str(out),
                "--method",
                "wanda",
                "--pattern",
                "2:4",
                "--sparsity",
                "0.5",
                *SMALL,
            ]
        )
    with pytest.raises(ValueError, match="joint quantization runs inside SparseGPT"):
        main(["prune", "--input", str(llama_dir), "--output", str(out), "--method", "wanda", "--bits", "4", *SMALL])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-moe"])
def test_builtin_model(name, tmp_path):
    if not (assets.ASSETS_DIR / "models" / name / "config.json").is_file():
        pytest.skip(f"builtin:{name} is not in this checkout")
    out = tmp_path / name
    # SparseGPT on the dense model; the MoE runs data-free magnitude (its calibration pass is the slow part on a
    # loaded CI machine, and the API tests cover calibrated experts on a small local Mixtral)
    method = "sparsegpt" if name == "tiny-llama" else "magnitude"
    main(
        [
            "prune",
            "--input",
            f"builtin:{name}",
            "--output",
            str(out),
            "--method",
            method,
            "--pattern",
            "2:4",
            "--save-24",
            "--samples",
            "4",
            "--seq-len",
            "64",
            "--eval-max-tokens",
            "600",
            "--eval-seq-len",
            "128",
            "--no-progress",
        ]
    )
    rep = read_report(out)
    assert rep["summary"]["achieved_sparsity"] == 0.5 and rep["eval"]["perplexity"]["compressed"] > 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["calibra_sparsity"]["pattern"] == "2:4"
    from calibra.prune.save import load_24

    saved = saved_tensors(out)
    dense = load_24(out)
    for n, w in dense.items():
        if f"{n}.weight" in saved:
            assert torch.equal(w, saved[f"{n}.weight"])
