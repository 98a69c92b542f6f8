"""The output-error clip search through calibra.quantize and the CLI flags: RTN with --clip output-mse
calibrates (its solve reads each Linear's Hessian), GPTQ keeps it inside the true-sequential runner, and
every module's report row says which clip it kept and its measured output error."""

from __future__ import annotations

import argparse

import pytest

import calibra
from calibra.cli import _quant_config
from calibra.data import CalibrationConfig
from calibra.quant import GPTQConfig, RTNConfig

from .conftest import CAL_KW


@pytest.mark.parametrize(
    "cfg",
    [
        RTNConfig(bits=4, group_size=32, mse_clip=True, clip_metric="output"),
        GPTQConfig(bits=4, group_size=32, mse_clip=True, clip_metric="output"),
    ],
    ids=["rtn", "gptq"],
)
def test_output_clip_job_records_the_choice(llama_folder, cfg):
    qm, rep = calibra.quantize(
        str(llama_folder), cfg, CalibrationConfig(**CAL_KW), evaluate=False, progress=False, echo=None
    )
    assert len(rep["modules"]) == 14
    for row in rep["modules"]:
        assert row["samples"] > 0  # the Hessian really reached the solve (RTN included)
        assert row["clip"] in ("output", "none") and 0 <= row["output_error"] < 1
    assert any(row["clip"] == "output" for row in rep["modules"])


def _args(**kw):
    base = dict(
        format="int",
        method="rtn",
        clip=None,
        mse_clip=False,
        group_size=None,
        bits=4,
        asym=False,
        desc_act=False,
        static_groups=False,
        damp=0.01,
        block_size=128,
        no_true_sequential=False,
    )
    return argparse.Namespace(**{**base, **kw})


def test_cli_clip_flags():
    assert _quant_config(_args()).mse_clip is False  # the default stays AutoGPTQ's min/max
    c = _quant_config(_args(clip="output-mse"))
    assert c.mse_clip and c.clip_metric == "output" and c.needs_hessian
    c = _quant_config(_args(method="gptq", mse_clip=True))
    assert c.mse_clip and c.clip_metric == "weight"
    c = _quant_config(_args(method="mr-gptq", format="nvfp4", clip="output-mse"))
    assert c.mse and c.clip_metric == "output"
    assert _quant_config(_args(method="mr-gptq", format="nvfp4")).clip_metric == "weight"
    with pytest.raises(ValueError, match="contradicts --clip output-mse"):
        _quant_config(_args(clip="output-mse", mse_clip=True))
