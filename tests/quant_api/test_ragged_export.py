"""Widths a group does not divide, end to end (issue 21): a tiny llama with intermediate_size 172 (the
``ragged_folder`` fixture, seeded) quantized with groups of 32. calibra's folder holds down_proj's ragged
last group (12 columns) and reloads to the simulated model; each engine format that cannot hold it keeps
those Linears dense, says so in report.json, the export's manifest and the CLI summary, and reloads (where
a loader is installed) to the simulated model."""

import json

import pytest
import torch

import calibra
from calibra.cli import main
from calibra.data import CalibrationConfig
from calibra.export import ExportError
from calibra.quant import GPTQConfig, RTNConfig

from .conftest import CAL_KW

DOWN = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
GATE_UP = [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up")]


def _q(folder, cfg, out, **kw):
    return calibra.quantize(
        str(folder), cfg, CalibrationConfig(**CAL_KW), output=out, evaluate=False, progress=False, echo=None, **kw
    )


def _logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("cfg", [GPTQConfig(group_size=32, desc_act=True), RTNConfig(group_size=32, sym=False)])
def test_calibra_folder_holds_the_ragged_group_and_reloads(ragged_folder, tmp_path, cfg):
    from safetensors.torch import load_file

    from calibra.quant.save import load

    out = tmp_path / "q"
    qm, report = _q(ragged_folder, cfg, out)
    assert report["summary"]["dense_modules"] == [] and "export_dense" not in report["summary"]
    assert report["summary"]["quantized_modules"] == 14
    t = load_file(str(out / "quantized.safetensors"))
    assert tuple(t[f"{DOWN[0]}.scales"].shape) == (64, 6)  # ceil(172 / 32): five whole groups and one of 12
    assert tuple(t[f"{DOWN[0]}.codes"].shape) == (64, 172)
    model, _ = load(out)
    assert torch.equal(model.get_submodule(DOWN[0]).weight, qm.model.get_submodule(DOWN[0]).weight)
    assert torch.equal(_logits(model), _logits(qm.model))


@pytest.mark.parametrize(
    "fmt,dense",
    [("compressed-tensors", DOWN), ("mlx", DOWN), ("gguf-q4_0", DOWN), ("gptq", sorted(DOWN + GATE_UP))],
)
def test_export_keeps_what_the_format_cannot_hold_dense(ragged_folder, tmp_path, fmt, dense):
    if fmt.startswith("gguf"):
        pytest.importorskip("gguf")
    out = tmp_path / fmt
    qm, report = _q(ragged_folder, RTNConfig(group_size=32), out, export=fmt)
    kept = report["summary"]["export_dense"]
    assert sorted(kept) == dense and all(why.startswith(f"{fmt}: ") for why in kept.values())
    assert sorted(report["summary"]["dense_modules"]) == dense
    assert not set(dense) & set(qm.layers)  # not quantized: the original weight, evaluated as exported
    man = json.loads((out / "calibra_manifest.json").read_text())
    assert man["kept_dense"] == kept
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["summary"]["export_dense"] == kept


def test_compressed_tensors_reload_equals_the_simulation(ragged_folder, tmp_path):
    """transformers + compressed-tensors load the export (down_proj dense, the rest pack-quantized) and
    compute the simulated model's logits (compressed-tensors 0.20 would raise on a ragged group:
    'tensor column shape must be divisible by the given group_size')."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ct"
    qm, _ = _q(ragged_folder, GPTQConfig(group_size=32), out, export="compressed-tensors")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(loaded.get_submodule(DOWN[0]).weight, torch.nn.Parameter)  # dense, as recorded
    ref = _logits(qm.model)
    assert float((_logits(loaded) - ref).abs().max()) <= 1e-3


def test_standalone_export_of_a_ragged_model_is_refused_with_the_way_out(ragged_folder, tmp_path):
    """A model quantized for calibra's folder (ragged groups inside) exported afterwards: the formats that
    cannot hold the groups refuse by layer, before writing, and name the fixes."""
    qm, _ = _q(ragged_folder, RTNConfig(group_size=32), tmp_path / "q")
    for fmt, match in (
        ("compressed-tensors", r"cannot hold 2 quantized layer\(s\).*ragged last group of 12"),
        ("mlx", r"cannot hold 2 quantized layer\(s\).*ragged last group of 12"),
        ("gptq", r"divisible by 32; 6 layer\(s\).*--export gptq"),
        ("gguf-q4_0", r"Q4_0 blocks need in_features divisible by 32; not: model.layers.0.mlp.down_proj"),
    ):
        with pytest.raises(ExportError, match=match):
            calibra.export(qm, tmp_path / f"x-{fmt}", fmt)
        assert not (tmp_path / f"x-{fmt}").exists()
    calibra.export(qm, tmp_path / "dense", "dense")  # the effective weights, any width


def test_cli_summary_says_which_layers_stay_dense(ragged_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    main(
        [
            "quantize",
            "--input",
            str(ragged_folder),
            "--output",
            str(out),
            "--method",
            "rtn",
            "--group-size",
            "32",
            "--export",
            "mlx",
            "--no-eval",
            "--no-progress",
        ]
    )
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if "kept dense for export" in ln)
    assert DOWN[0] in line and "ragged last group of 12" in line
    html = (out / "report.html").read_text()
    assert "kept dense for export" in html and "ragged last group of 12" in html


def test_streamed_job_keeps_the_same_layers_dense(ragged_folder, tmp_path):
    """--stream decides from the same shapes: the same Linears dense, recorded in its manifest, and the
    written checkpoint loads to the in-memory job's export."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    cfg = GPTQConfig(group_size=32)
    _, rep = _q(ragged_folder, cfg, tmp_path / "s", export="compressed-tensors", stream=True)
    _q(ragged_folder, cfg, tmp_path / "m", export="compressed-tensors")
    assert sorted(rep["summary"]["export_dense"]) == DOWN
    man = json.loads((tmp_path / "s" / "calibra_manifest.json").read_text())
    assert sorted(man["kept_dense"]) == DOWN
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32)
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert float((_logits(streamed) - _logits(in_memory)).abs().max()) <= 1e-5
