"""MR-GPTQ (Micro-Rotated GPTQ; Egiazarian et al., 2025, "Bridging the Gap Between Promise and
Performance for Microscaling FP4 Quantization"): rotate W's input dimension with a block-diagonal
Hadamard transform whose block equals the FP4 scale group (16 for NVFP4, 32 for MXFP4), run GPTQ in
the rotated space onto the FP4 grid with MSE-searched group scales, and record the rotation.

With Hn the normalized (symmetric, orthonormal) block Hadamard matrix: y = W x = (W Hn)(Hn x), so
W' = hadamard(W) and x' = hadamard(x); the rotated Hessian is H' = Hn H Hn (block-diagonal rotation
of both sides). Evaluation and export must apply x -> hadamard(x, block_size) before the stored
weight; ``QuantizedLayer.dense()`` un-rotates it instead (W_eff = hadamard(W'_q)).

The rotation does not help every Linear: it spreads a group's outliers over the group, which FP4's
fine-grained scales (16 or 32 columns) often handle better unrotated, and on builtin:tiny-llama
(NVFP4) rotating every Linear lost to plain RTN. So by default (``MRGPTQConfig.choose``) each Linear is
solved several ways -- GPTQ rotated and unrotated with the config's scale search, and plain RTN; with
``candidates="all"`` each GPTQ also with no clip, the weight-MSE clip search and the output-error clip
search (:mod:`calibra.quant.clip_search`), and RTN with the output search -- and the one with the least measured
output error ``tr((W - Q) H (W - Q)^T)`` on its calibration
Hessian is kept (ties: the earlier in :data:`CANDIDATES`). ``log.choice`` records the kept candidate
and every candidate's relative error. The result is then never worse than RTN or than the plain
rotated solve *on the layer's own inputs*; the model-level effect is measured in docs/quantize.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from calibra.mps import mps_semantics, on_host
from calibra.ops import hadamard
from calibra.quant.clip_search import output_error
from calibra.quant.config import MRGPTQConfig, RTNConfig
from calibra.quant.gptq import SharedFactorizations, _solve, guarded_solve, output_clip
from calibra.quant.result import QuantizedLayer
from calibra.quant.rtn import rtn_quantize
from calibra.quant.validate import check_hessian, check_weight

CANDIDATES = (
    "gptq-rotated-mse",
    "gptq-rotated-output",
    "gptq-rotated-none",
    "gptq-mse",
    "gptq-output",
    "gptq-none",
    "rtn",
)
"""What :func:`mr_gptq_quantize` tries per Linear with ``choose``, in tie-breaking order: GPTQ on the
FP4 grid (``-rotated``: in the block-Hadamard space) with the weight-MSE clip search, the output-error
clip search or no clip, and RTN (the output search guarded against no clip: ``choice["rtn_clip"]``)."""


def candidates_of(config: MRGPTQConfig) -> tuple[str, ...]:
    """The labels of :data:`CANDIDATES` that ``config.candidates`` tries, in the same order ("quick": the
    rotated and unrotated GPTQ with the config's scale search, and plain RTN)."""
    if config.candidates == "all":
        return CANDIDATES
    clip = "none" if not config.mse else ("output" if config.clip_metric == "output" else "mse")
    return (f"gptq-rotated-{clip}", f"gptq-{clip}", "rtn")


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
    "axis": "in"}`` (``None`` where ``config.choose`` kept an unrotated candidate; ``log.choice`` says
    which and why).
    """
    config.validate()
    check_weight(w, config, name)
    check_hessian(h, n_tokens, w.shape[1], name)
    b = config.rotation_block
    wr = hadamard(w.detach().float(), b)
    hr = rotate_hessian(h, b)
    rotation = {"kind": "hadamard", "block_size": b, "axis": "in"}
    kw = dict(name=name, layer=layer, out_dtype=w.dtype, sweep=sweep, method="mr_gptq")
    if config.choose:
        return _choose(w, h, wr, hr, n_tokens, config, rotation, kw)
    if output_clip(config.gptq()):
        return guarded_solve(wr, hr, n_tokens, config.gptq(), rotation=rotation, **kw)
    return _solve(wr, hr, n_tokens, config.gptq(), rotation=rotation, **kw)


def _choose(w, h, wr, hr, n_tokens, config: MRGPTQConfig, rotation: dict, kw: dict) -> QuantizedLayer:
    """Every candidate of :func:`candidates_of`, measured in the original space on ``h``; the least wins."""
    t0 = time.perf_counter()
    wf = w.detach().float()
    base = config.gptq()
    clips = {
        "mse": dataclasses.replace(base, mse_clip=True, clip_metric="weight"),
        "output": dataclasses.replace(base, mse_clip=True, clip_metric="output"),
        "none": dataclasses.replace(base, mse_clip=False, clip_metric="weight"),
    }
    shared_rot, shared_plain = SharedFactorizations(), SharedFactorizations()  # one factor per space
    errors: dict[str, float] = {}
    best, best_label = None, None
    for label in candidates_of(config):
        if label == "rtn":
            # "all": RTN with the output-error clip search (guarded against no clip); "quick": plain RTN,
            # the baseline the choice must not lose to (the search costs ~10x the GPTQ solves here)
            search = config.candidates == "all"
            rcfg = RTNConfig(
                bits=4,
                group_size=base.group_size,
                format=base.format,
                mse_clip=search,
                clip_metric="output" if search else "weight",
            )
            ql = rtn_quantize(w, rcfg, name=kw["name"], layer=kw["layer"], h=h, n_tokens=n_tokens)
        else:
            cfg = clips[label.rsplit("-", 1)[1]]
            if "-rotated-" in label:
                ql = _solve(wr.clone(), hr, n_tokens, cfg, rotation=rotation, shared=shared_rot, **kw)
            else:
                ql = _solve(wf.clone(), h, n_tokens, cfg, shared=shared_plain, **kw)
        errors[label] = output_error(wf, ql.dense(), h)
        if best is None or errors[label] < errors[best_label]:
            best, best_label = ql, label
        del ql
    log = best.log
    log.method, best.method = "mr_gptq", "mr_gptq"
    log.output_error = errors[best_label]
    log.choice = {
        "kept": best_label,
        "rotated": best.rotation is not None,
        "solver": "rtn" if best_label == "rtn" else "gptq",
        "rtn_clip": None,
        "output_error": errors,
    }
    if best_label == "rtn":
        log.choice["rtn_clip"] = log.clip
    log.seconds = time.perf_counter() - t0
    return best
