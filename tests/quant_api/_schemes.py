"""Helpers of the activation-quantized scheme tests (fp8, w8a8): a quiet quantize on the tiny folder,
logits on fixed random ids, and the relative logit difference they are compared by."""

from __future__ import annotations

import torch

import calibra
from calibra.data import CalibrationConfig
from tests.quant_api.conftest import CAL_KW

TOL = 1e-3  # relative, on the logits


def quantize_quiet(folder, out=None, **kw):
    return calibra.quantize(
        str(folder),
        calibration=CalibrationConfig(**CAL_KW),
        output=None if out is None else str(out),
        evaluate=False,
        progress=False,
        echo=None,
        **kw,
    )


def logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 250, (2, 24), generator=g)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())
