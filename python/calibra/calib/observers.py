"""Observers: the statistics a calibration pass collects, each in an exactly mergeable form.

Every observer stores **sums and counts** (never means), in float64 where it is cheap, so the
statistics of two runs over disjoint samples add up to the statistics of one run over both
(``calibra.calib.stats.merge``). Observers only ever see unpadded tokens: the runner selects the
rows where the attention mask is True before calling them.

Keys in ``CalibrationStats.tensors`` are ``<kind>/<field>/<module path>``; token counts are in
``CalibrationStats.counts`` under ``<kind>/<module path>``.

* ``HessianObserver`` -- ``hessian/sum/<m>``: ``sum_t x_t x_t^T`` over the input rows of Linear ``m``
  (``calibra.ops.hessian_accumulate``), float32 (default) or float64, whatever the model's dtype:
  bf16/fp16 activations are widened exactly, never summed in half precision (FAULTS row 20).
  GPTQ's ``H = 2/n sum x x^T`` is ``2 * sum / count``.
* ``ChannelNormObserver`` -- ``norms/sumsq/<m>``: per input channel ``sum_t x_tj^2`` in float64 (and
  ``norms/sum/<m>``). Wanda's ``||X_j||_2`` is ``sqrt(sumsq)``; mean/variance follow from the
  sums. Sums and counts are the exact mergeable form of Welford's running mean/M2: Welford's
  pairwise-merge formula reproduces exactly these sums, so storing them loses nothing and merges
  without the error of averaging averages.
* ``RangeObserver`` -- per input channel ``ranges/min``, ``ranges/max`` (merge: elementwise
  min/max, exact) and ``ranges/hist/<m>``: a per-module histogram of values on a fixed log-scale
  grid (16 bins per octave from 2^-40 to 2^40, both signs, plus a zero bin; int64 counts). The grid
  does not depend on the data, so histograms of separate runs add exactly; a percentile read from
  it is exact to one bin (a relative 2^(1/16) - 1 = 4.4%). ``percentile()`` and ``smooth_factors()``
  read them.
* ``KVCovarianceObserver`` -- per decoder layer and KV head: ``kv/k_outer/<layer>``
  ``[Hkv, d, d]`` = ``sum k k^T``, ``kv/k_sum/<layer>`` ``[Hkv, d]`` (and the same for v), float64;
  the covariance is ``outer/n - mean mean^T``. Keys are taken before RoPE (see
  ``ModelAdapter.key_value_sources``).
* ``CrossObserver`` -- ``gptaq/cross/<m>``: ``sum_t (x_fp_t - x_t) x_t^T`` (``[in, in]``, float32 or
  float64 as the Hessian) between Linear ``m``'s input in the full-precision model (``x_fp``) and in the
  model as quantized so far (``x``, the Hessian's rows); GPTAQ's C (``calibra.quant.gptaq``). The runner
  records the full-precision rows (``LayerRunner(gptaq=True)``) and hands them over by ``fp_rows``; a
  module without them (an MoE expert) gets no cross statistic.
* ``check_activations_finite`` -- the NaN/Inf guard (FAULTS row 17): raises naming the layer, module
  and the calibration sample before the value reaches any statistic.
"""

from __future__ import annotations

import contextlib
import math

import torch

from calibra import ops
from calibra.finite import all_finite
from calibra.mps import mps_semantics, on_host

OBSERVER_KINDS = ("hessian", "norms", "ranges", "kv")


class NonFiniteActivationError(FloatingPointError):
    """An activation that would feed a statistic is NaN or Inf."""


def check_activations_finite(x: torch.Tensor, mask: torch.Tensor | None, sample_ids: list[int], where: str) -> None:
    """Raise ``NonFiniteActivationError`` if any unpadded token of ``x [B, L, D]`` is NaN/Inf.

    ``sample_ids[b]`` is the calibration sample index of batch row ``b``; the message names the first
    bad sample and token, ``where`` names the layer/module.
    """
    # Fast path, one min/max pass and no temporaries: no NaN/Inf anywhere (padding included). Only a
    # tensor with one pays for the exact, mask-aware search below.
    if x.is_floating_point() and all_finite(x):
        return
    bad = ~torch.isfinite(x)
    if x.dim() >= 1:
        bad = bad.reshape(*x.shape[:-1], x.shape[-1]).any(dim=-1)
    if mask is not None and bad.shape == mask.shape:
        bad = bad & mask.to(bad.device)
    if not bool(bad.any()):
        return
    pos = bad.nonzero()[0].tolist()
    row = pos[0] if bad.dim() >= 2 else 0
    tok = pos[-1] if bad.dim() >= 2 else pos[0]
    sample = sample_ids[row] if row < len(sample_ids) else row
    vals = x[tuple(pos)] if bad.dim() >= 1 else x
    kind = "NaN" if bool(torch.isnan(vals).any()) else "Inf"
    raise NonFiniteActivationError(
        f"[calibrate] {kind} in the activations at {where}, calibration sample {sample}, token {tok} "
        f"(dtype {x.dtype}). fp16 overflows above 65504: load the model in bfloat16 or float32 "
        "(dtype='float32'), or drop that sample."
    )


class Observer:
    """Base class. ``linear(key, x)`` receives the unpadded input rows ``x [n, d]`` of a Linear (or of
    one expert's projection); ``kv(layer_key, which, x)`` receives keys/values ``[n, Hkv*d]``."""

    kind = "observer"

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def linear(self, key: str, x: torch.Tensor) -> None:  # pragma: no cover - overridden
        pass

    def linear_shared(self, key: str, src_key: str, x: torch.Tensor) -> None:
        """``x`` is the very input ``src_key`` just received (q/k/v, gate/up). Default: observe it again;
        an observer whose statistic depends on the input alone may share ``src_key``'s instead."""
        self.linear(key, x)

    def kv(self, layer_key: str, which: str, x: torch.Tensor, num_heads: int) -> None:
        pass

    def _count(self, key: str, n: int) -> None:
        self.counts[f"{self.kind}/{key}"] = self.counts.get(f"{self.kind}/{key}", 0) + int(n)

    def to_cpu(self, prefix: str) -> None:
        """Move the finished statistics of one layer (keys containing ``prefix``) off the device."""
        for k, v in self.tensors.items():
            if prefix in k and v.device.type != "cpu":
                self.tensors[k] = v.cpu()


class HessianObserver(Observer):
    kind = "hessian"

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"[calibrate] hessian dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype

    def linear(self, key: str, x: torch.Tensor) -> None:
        name = f"hessian/sum/{key}"
        H = self.tensors.get(name)
        if H is None:
            H = self.tensors[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=self.dtype, device=x.device)
        if x.shape[0]:
            ops.hessian_accumulate(H, x)
        self._count(key, x.shape[0])

    def linear_shared(self, key: str, src_key: str, x: torch.Tensor) -> None:
        # Modules reading one input have one Hessian: alias src_key's sum (one accumulation instead of three
        # for q/k/v). Aliasing starts only on src_key's first batch -- every later batch then shares too, as
        # hooks fire in the same order -- otherwise (e.g. statistics restored from disk) accumulate as usual.
        name, src = f"hessian/sum/{key}", f"hessian/sum/{src_key}"
        H = self.tensors.get(name)
        if H is None and self.counts.get(f"{self.kind}/{src_key}") == x.shape[0]:
            self.tensors[name] = self.tensors[src]
        elif H is None or H is not self.tensors[src]:
            return self.linear(key, x)
        self._count(key, x.shape[0])


class CrossObserver(Observer):
    kind = "gptaq"

    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self.fp_rows = lambda key: None
        """``fp_rows(key)``: the full-precision model's input rows of ``key`` for the batch being observed
        (the same tokens, in the same order, as the ``x`` the hooks pass), or None."""

    def linear(self, key: str, x: torch.Tensor) -> None:
        x_fp = self.fp_rows(key)
        if x_fp is None:
            return
        if tuple(x_fp.shape) != tuple(x.shape):
            raise RuntimeError(
                f"[calibrate] full-precision inputs of {key} are {list(x_fp.shape)}, the quantized model's "
                f"{list(x.shape)}: the two streams are not aligned"
            )
        name = f"gptaq/cross/{key}"
        c = self.tensors.get(name)
        if c is None:
            c = self.tensors[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=self.dtype, device=x.device)
        if x.shape[0]:
            xq = x.to(self.dtype)
            c.addmm_((x_fp.to(x.device, self.dtype) - xq).t(), xq)
        self._count(key, x.shape[0])

    def linear_shared(self, key: str, src_key: str, x: torch.Tensor) -> None:
        # the same input and the same full-precision input: one sum, aliased (as the Hessian's)
        name, src = f"gptaq/cross/{key}", f"gptaq/cross/{src_key}"
        c = self.tensors.get(name)
        if c is None and src in self.tensors and self.counts.get(f"{self.kind}/{src_key}") == x.shape[0]:
            self.tensors[name] = self.tensors[src]
        elif c is None or c is not self.tensors.get(src):
            return self.linear(key, x)
        self._count(key, x.shape[0])


class ChannelNormObserver(Observer):
    kind = "norms"

    def linear(self, key: str, x: torch.Tensor) -> None:
        # MPS has no float64: there the sums live on the CPU (x is copied over, unified memory)
        host = mps_semantics(x.device)
        with on_host() if host else contextlib.nullcontext():
            xd = (x.cpu() if host else x).double()
            for field, val in (("sumsq", xd.square().sum(0)), ("sum", xd.sum(0))):
                name = f"norms/{field}/{key}"
                if name in self.tensors:
                    self.tensors[name] += val
                else:
                    self.tensors[name] = val
        self._count(key, x.shape[0])


# fixed log-scale grid of the range histograms
HIST_SUB = 16  # bins per octave
HIST_MIN_EXP = -40  # |x| < 2^-40 counts as zero
HIST_OCTAVES = 80  # up to 2^40 (larger values land in the last bin)
HIST_HALF = HIST_SUB * HIST_OCTAVES
HIST_BINS = 2 * HIST_HALF + 1  # [negatives (descending |x|) | zero | positives (ascending)]


def histogram_bins(x: torch.Tensor) -> torch.Tensor:
    """Bin index of every value on the fixed grid (int64, same shape as ``x``)."""
    xf = x.float()
    a = xf.abs()
    mant, exp = torch.frexp(a)  # a = mant * 2^exp, mant in [0.5, 1)
    octave = (exp - 1 - HIST_MIN_EXP).long()  # a in [2^(exp-1), 2^exp)
    sub = ((mant * 2 - 1) * HIST_SUB).floor().long().clamp_(0, HIST_SUB - 1)
    k = (octave * HIST_SUB + sub).clamp_(0, HIST_HALF - 1)
    zero = a < 2.0**HIST_MIN_EXP
    idx = torch.where(xf >= 0, HIST_HALF + 1 + k, HIST_HALF - 1 - k)
    return torch.where(zero, torch.full_like(idx, HIST_HALF), idx)


def bin_upper_value(idx: int) -> float:
    """The value at the far-from-zero edge of bin ``idx`` (conservative for clipping ranges)."""
    if idx == HIST_HALF:
        return 0.0
    k = idx - HIST_HALF - 1 if idx > HIST_HALF else HIST_HALF - 1 - idx
    octave, sub = divmod(k, HIST_SUB)
    mag = 2.0 ** (octave + HIST_MIN_EXP) * (1 + (sub + 1) / HIST_SUB)
    return mag if idx > HIST_HALF else -mag


class RangeObserver(Observer):
    kind = "ranges"

    def linear(self, key: str, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            self._count(key, 0)
            return
        xf = x.float()
        mn, mx = xf.amin(0), xf.amax(0)
        if mps_semantics(x.device):  # MPS has no frexp: the histogram is counted on the CPU
            with on_host():
                hist = torch.bincount(histogram_bins(xf.cpu()).reshape(-1), minlength=HIST_BINS).to(x.device)
        else:
            hist = torch.bincount(histogram_bins(xf).reshape(-1), minlength=HIST_BINS)
        for field, val, fn in (("min", mn, torch.minimum), ("max", mx, torch.maximum), ("hist", hist, None)):
            name = f"ranges/{field}/{key}"
            old = self.tensors.get(name)
            self.tensors[name] = val if old is None else (old + val if fn is None else fn(old, val))
        self._count(key, x.shape[0])


class KVCovarianceObserver(Observer):
    kind = "kv"

    def kv(self, layer_key: str, which: str, x: torch.Tensor, num_heads: int) -> None:
        n = x.shape[0]
        host = mps_semantics(x.device)  # MPS has no float64: there the sums live on the CPU
        with on_host() if host else contextlib.nullcontext():
            xh = (x.cpu() if host else x).double().reshape(n, num_heads, -1).transpose(0, 1)  # [Hkv, n, d]
            outer = xh.transpose(1, 2) @ xh
            s = xh.sum(1)
            for field, val in ((f"{which}_outer", outer), (f"{which}_sum", s)):
                name = f"kv/{field}/{layer_key}"
                self.tensors[name] = val if name not in self.tensors else self.tensors[name] + val
        self._count(f"{which}/{layer_key}", n)


def make_observers(kinds, hessian_dtype: torch.dtype = torch.float32) -> list[Observer]:
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    out = []
    for k in kinds:
        if k == "hessian":
            out.append(HessianObserver(hessian_dtype))
        elif k == "norms":
            out.append(ChannelNormObserver())
        elif k == "ranges":
            out.append(RangeObserver())
        elif k == "kv":
            out.append(KVCovarianceObserver())
        else:
            raise ValueError(f"[calibrate] unknown observer {k!r}; choose from {', '.join(OBSERVER_KINDS)}")
    return out


def percentile(hist: torch.Tensor, q: float) -> float:
    """The ``q``-th percentile (0..100) of the values summarised by a range histogram, to one bin."""
    if not 0 <= q <= 100:
        raise ValueError(f"[calibrate] percentile q must be in [0, 100], got {q}")
    total = int(hist.sum())
    if total == 0:
        return math.nan
    target = max(1, math.ceil(q / 100 * total))
    idx = int(torch.searchsorted(hist.cumsum(0), torch.tensor(target, dtype=hist.dtype)))
    return bin_upper_value(idx)


def smooth_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant per-input-channel factors ``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)`` from the
    range observer's ``max(|min|, |max|)`` and the Linear's weight ``[out, in]``."""
    w = weight.detach().float().abs().amax(0).clamp_min(1e-5)
    a = act_absmax.float().clamp_min(1e-5)
    return a.pow(alpha) / w.pow(1 - alpha)
