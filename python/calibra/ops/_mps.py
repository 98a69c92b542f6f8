"""Metal (MPS) registrations, for Apple Silicon: the kernels of ``metal/*.metal`` launched on PyTorch's
MPS stream by :mod:`calibra._metal`. Registered only when torch sees an MPS device; elsewhere this
registers nothing and calibra.build_info() says why.

Metal kernels cannot raise, so the data errors the CPU kernels and the references raise are checked
here, on the host, before the launch (:data:`DATA_CHECKS`), with the references' own checks and
messages.
"""

import torch

from calibra.ops._ref.gptq import _check_data
from calibra.ops._ref.pack import check_codes
from calibra.ops._ref.quantize import check_weight_finite
from calibra.ops._ref.sparsity import bad_meta_message, nan_error_message, not_24_message
from calibra.ops._registry import MPS_DATA_CHECKS, register_backend


def _finite_w(w, *args) -> None:
    check_weight_finite(w)


def _codes_fit(codes, bits, *args) -> None:
    check_codes(codes, bits)


def _no_nan_scores(scores, *args) -> None:
    nan = torch.isnan(scores)
    if bool(nan.any()):
        raise ValueError(nan_error_message(nan.nonzero()[0].tolist()))


def _is_24(w) -> None:
    r, k = w.shape
    count = (w.reshape(r, k // 4, 4) != 0).sum(-1)
    if bool((count > 2).any()):
        gr, gg = (int(v) for v in (count > 2).nonzero()[0])
        raise ValueError(not_24_message(gr, 4 * gg, int(count[gr, gg])))


def _valid_meta(values, meta) -> None:
    word = meta.to(torch.int64) & 0xFFFF
    nib = (word.unsqueeze(-1) >> (4 * torch.arange(4, device=meta.device))) & 0xF
    bad = (nib & 3) >= (nib >> 2)
    if bool(bad.any()):
        br, bj, bg = (int(v) for v in bad.nonzero()[0])
        raise ValueError(bad_meta_message(br, bj, int(word[br, bj]), bg))


def _sweep_tables(w, u, scales, zeros, group, fit, *args) -> None:
    _check_data(group.cpu(), fit.cpu(), scales.shape[1])


def _nm_sweep_tables(*args) -> None:
    try:
        _sweep_tables(*args)
    except ValueError as e:  # the reference's message, named for this op
        raise ValueError(str(e).replace("[gptq_block_sweep]", "[sparsegpt_block_sweep]", 1)) from None


DATA_CHECKS = {
    "quantize_int": _finite_w,
    "quantize_fp4": _finite_w,
    "pack": _codes_fit,
    "nm_mask": _no_nan_scores,
    "compress_24": _is_24,
    "decompress_24": _valid_meta,
    "gptq_block_sweep": _sweep_tables,
    "sparsegpt_block_sweep": _nm_sweep_tables,
}
MPS_DATA_CHECKS.update(DATA_CHECKS)

_mps = getattr(torch.backends, "mps", None)
REGISTERED = register_backend("mps", "MPS") if _mps is not None and _mps.is_available() else []
