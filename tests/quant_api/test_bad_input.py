"""Bad input: a clear error, before the model loads where no weight is needed, naming the module where
one is; and nothing written (FAULTS rows 10, 11, 13, 17, 18, 26)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import calibra
from calibra.calib import NonFiniteActivationError
from calibra.data import CalibrationConfig
from calibra.quant import GPTQConfig, MRGPTQConfig, RTNConfig

from .conftest import CAL_KW, make_folder


def _q(folder, cfg, out, **kw):
    return calibra.quantize(
        str(folder), cfg, CalibrationConfig(**CAL_KW), output=out, evaluate=False, progress=False, echo=None, **kw
    )


def test_fp4_block_not_dividing_lists_every_layer_before_load(ragged_folder, tmp_path, no_load):
    """FAULTS row 11: an int group leaves a ragged last group, but FP4's fixed scale blocks cannot: every such
    layer is listed before a weight loads."""
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        _q(ragged_folder, GPTQConfig(bits=4, group_size=16, format="nvfp4"), out)
    msg = str(e.value)
    assert msg.startswith("[quantize] 2 layer(s)")
    assert "nvfp4 needs in_features divisible by its scale block 16, layer model.layers.0.mlp.down_proj has 172" in msg
    assert "model.layers.1.mlp.down_proj" in msg and "q_proj" not in msg
    assert not out.exists()


@pytest.mark.parametrize(
    "cfg,match",
    [
        (RTNConfig(bits=9), "bits must be an int in \\[2, 8\\]"),
        (GPTQConfig(bits=1), "bits must be an int in \\[2, 8\\]"),
        (GPTQConfig(damp_percent=0.0), "damp_percent"),
        (MRGPTQConfig(format="int"), "format must be 'mxfp4' or 'nvfp4'"),
        (GPTQConfig(format="mxfp4", bits=4, group_size=32, desc_act=True), "static_groups"),
    ],
)
def test_config_out_of_range_before_load(llama_folder, tmp_path, no_load, cfg, match):
    with pytest.raises(ValueError, match=match):
        _q(llama_folder, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_already_quantized_model_refused_before_load(llama_folder, tmp_path, no_load):
    folder = tmp_path / "gptq-model"
    shutil.copytree(llama_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"\[quantize\] .* already quantized .*quant_method 'gptq'"):
        _q(folder, RTNConfig(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_indefinite_hessian_names_module_and_writes_nothing(llama_folder, tmp_path):
    stats = calibra.calibrate(str(llama_folder), CalibrationConfig(**CAL_KW), progress=False, echo=None)
    bad = "model.layers.1.mlp.down_proj"
    n = stats.tensors[f"hessian/sum/{bad}"].shape[0]
    # diag 1, off-diagonal -100: eigenvalues down to 1 - 100 (n - 1); no damping on the ladder fixes it
    H = -100.0 * (torch.ones(n, n) - torch.eye(n)) + torch.eye(n)
    stats.tensors[f"hessian/sum/{bad}"] = H * stats.count("hessian", bad)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"\[gptq\] Hessian of {bad} is not positive definite"):
        calibra.quantize(
            str(llama_folder),
            GPTQConfig(group_size=32, true_sequential=False),
            stats=stats,
            output=out,
            evaluate=False,
            progress=False,
            echo=None,
        )
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fp16_overflow_names_layer_and_writes_nothing(tmp_path):
    folder = make_folder(tmp_path / "fp16", "llama", dtype=torch.float16)
    from safetensors.torch import load_file, save_file

    w = load_file(str(folder / "model.safetensors"))
    w["model.layers.0.mlp.up_proj.weight"] = (w["model.layers.0.mlp.up_proj.weight"].float() * 3e4).half()
    w["model.layers.0.mlp.gate_proj.weight"] = (w["model.layers.0.mlp.gate_proj.weight"].float() * 3e4).half()
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(NonFiniteActivationError, match=r"model\.layers\.0\..*calibration sample \d+.*65504"):
        calibra.quantize(
            str(folder),
            GPTQConfig(group_size=32),
            CalibrationConfig(**CAL_KW),
            output=out,
            dtype="float16",
            evaluate=False,
            progress=False,
            echo=None,
        )
    assert not out.exists()


def test_act_ranges_refused_for_gptq_before_load(llama_folder, tmp_path, no_load):
    with pytest.raises(ValueError, match="RTN only"):
        _q(llama_folder, GPTQConfig(group_size=32), tmp_path / "o", act_ranges=True)


def test_mixed_precision_budget_checked(llama_folder, tmp_path, no_load):
    with pytest.raises(ValueError, match="budget"):
        _q(llama_folder, GPTQConfig(group_size=32), tmp_path / "o", mixed_precision=40)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "gptq", "mlx"])
def test_export_refusals_that_need_no_weights_come_before_load(moe_folder, llama_folder, tmp_path, no_load, fmt):
    """MR-GPTQ's rotation (every engine format) and fused MoE experts (formats that do not write them per
    expert: mlx, gguf) are refused whatever the weights: before the model loads, not after calibration."""
    from calibra.export import ExportError

    if fmt == "mlx":
        with pytest.raises(ExportError, match=rf"\[export\] {fmt}: quantized fused MoE expert weights"):
            _q(moe_folder, GPTQConfig(group_size=32), tmp_path / "o", export=fmt)
    with pytest.raises(ExportError, match="Hadamard rotation"):
        _q(llama_folder, MRGPTQConfig(), tmp_path / "o", export=fmt)
    assert not (tmp_path / "o").exists()


def test_moe_engine_exports_pass_the_precheck():
    """compressed-tensors and GPTQ write fused experts per expert: the pre-load check lets them through."""
    from calibra.export import precheck

    names = ["model.layers.0.mlp.experts.0.gate_up_proj", "model.layers.0.mlp.experts.0.down_proj"]
    assert precheck("compressed-tensors,gptq", names, rotated=False) == ["compressed-tensors", "gptq"]


def test_the_executable_prints_user_errors_and_keeps_tracebacks_for_bugs(llama_folder, tmp_path, capsys, monkeypatch):
    from calibra import cli

    out = tmp_path / "o"
    out.mkdir()
    args = ["quantize", "--input", str(llama_folder), "--output", str(out), "--method", "rtn"]
    assert cli.run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"calibra: error: [quantize] output {out} already exists; pass overwrite=True (--overwrite) to "
        f"replace it whole, or choose another path"
    ]
    with pytest.raises(FileExistsError, match="already exists"):  # main() raises: for tests and embedding
        cli.main(args)

    def bug(args):
        raise KeyError("a bug")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_fn(parser(), bug))
    with pytest.raises(KeyError, match="a bug"):
        cli.run(args)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", lambda: _with_fn(parser(), interrupted))
    assert cli.run(args) == 130


def _with_fn(parser, fn):
    """``parser`` whose every command runs ``fn``."""
    parse = parser.parse_args

    def parse_args(argv=None):
        ns = parse(argv)
        ns.fn = fn
        return ns

    parser.parse_args = parse_args
    return parser
