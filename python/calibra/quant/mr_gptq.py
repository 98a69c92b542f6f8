"""MR-GPTQ (Micro-Rotated GPTQ; Egiazarian et al., 2025, "Bridging the Gap Between Promise and
Performance for Microscaling FP4 Quantization"): rotate W's input dimension with a block-diagonal
Hadamard transform whose block equals the FP4 scale group (16 for NVFP4, 32 for MXFP4), run GPTQ in
the rotated space onto the FP4 grid with MSE-searched group scales, and record the rotation.

With Hn the normalized (symmetric, orthonormal) block Hadamard matrix: y = W x = (W Hn)(Hn x), so
W' = hadamard(W) and x' = hadamard(x); the rotated Hessian is H' = Hn H Hn (block-diagonal rotation
of both sides). Evaluation and export must apply x -> hadamard(x, block_size) before the stored
weight; ``QuantizedLayer.dense()`` un-rotates it instead (W_eff = hadamard(W'_q)).
"""

from __future__ import annotations

import contextlib

import torch

from calibra.mps import mps_semantics, on_host
from calibra.ops import hadamard
from calibra.quant.config import MRGPTQConfig
from calibra.quant.gptq import _solve
from calibra.quant.result import QuantizedLayer
from calibra.quant.validate import check_hessian, check_weight


def rotate_hessian(h: torch.Tensor, block_size: int) -> torch.Tensor:
    """Hn H Hn in float64 (H symmetric), symmetrized against rounding. On MPS (no float64) on the CPU:
    the result stays there, and the GPTQ solve keeps its float64 steps on the CPU too."""
    host = mps_semantics(h.device)
    with on_host() if host else contextlib.nullcontext():
        h64 = (h.detach().cpu() if host else h.detach()).double()
        hr = hadamard(hadamard(h64, block_size).T.contiguous(), block_size)
        return (hr + hr.T) / 2


def mr_gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    n_tokens: int,
    config: MRGPTQConfig,
    *,
    name: str = "weight",
    layer: int | None = None,
    sweep=None,
) -> QuantizedLayer:
    """MR-GPTQ of ``w [out, in]`` with Hessian sum ``h`` over ``n_tokens`` tokens (neither is modified).

    The returned tensors describe the rotated weight; ``rotation = {"kind": "hadamard", "block_size": b,
    "axis": "in"}``.
    """
    config.validate()
    check_weight(w, config, name)
    check_hessian(h, n_tokens, w.shape[1], name)
    b = config.rotation_block
    wr = hadamard(w.detach().float(), b)
    hr = rotate_hessian(h, b)
    return _solve(
        wr,
        hr,
        n_tokens,
        config.gptq(),
        name=name,
        layer=layer,
        out_dtype=w.dtype,
        sweep=sweep,
        method="mr_gptq",
        rotation={"kind": "hadamard", "block_size": b, "axis": "in"},
    )
