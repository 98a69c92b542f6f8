"""What a pruning solver takes (:class:`LayerStats`) and returns (:class:`PrunedLayer`) for one weight."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from calibra.mps import mps_semantics, on_host
from calibra.ops import QuantizedTensor, compress_24


@dataclass
class LayerStats:
    """Calibration statistics of one Linear's inputs ``X [tokens, in]``.

    - ``hessian``: the sum ``X^T X`` (float32 or float64 ``[in, in]``), SparseGPT's input.
    - ``n_tokens``: tokens behind ``hessian`` / ``channel_sumsq``.
    - ``channel_sumsq``: ``sum_t x_tj^2`` per input channel ``j`` (``[in]``); Wanda's ``||X_j||_2`` is its
      square root. When only a Hessian is given, its diagonal is the same quantity.
    """

    hessian: torch.Tensor | None = None
    n_tokens: int = 0
    channel_sumsq: torch.Tensor | None = None

    @classmethod
    def from_inputs(cls, x: torch.Tensor, hessian: bool = True) -> LayerStats:
        """Statistics of explicit inputs ``x [..., in]`` (tests and small tools), accumulated in float64."""
        xd = x.reshape(-1, x.shape[-1]).double()
        return cls(hessian=(xd.T @ xd) if hessian else None, n_tokens=xd.shape[0], channel_sumsq=xd.square().sum(0))

    @classmethod
    def from_calibration(cls, stats, module: str) -> LayerStats:
        """From a ``calibra.calib.CalibrationStats`` (keys ``hessian/sum/<m>``, ``norms/sumsq/<m>`` and their
        counts), duck-typed so that this module does not need the calibration package loaded."""
        t, counts = stats.tensors, stats.counts
        h = t.get(f"hessian/sum/{module}")
        sq = t.get(f"norms/sumsq/{module}")
        n = int(counts.get(f"hessian/{module}", 0) if h is not None else counts.get(f"norms/{module}", 0))
        return cls(hessian=h, n_tokens=n, channel_sumsq=sq)

    def sumsq(self) -> torch.Tensor | None:
        if self.channel_sumsq is not None:
            return self.channel_sumsq
        return None if self.hessian is None else self.hessian.diagonal()


def relative_output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||(W - W_hat) X^T||_F^2 / ||W X^T||_F^2`` from the Hessian sum ``H = X^T X`` (float64):
    ``tr(D H D^T) / tr(W H W^T)`` with ``D = W - W_hat``. 0 when the layer's output is identically 0."""
    host = mps_semantics(w.device)  # MPS has no float64: the traces are taken on the CPU
    with on_host() if host else contextlib.nullcontext():
        if host:
            w, w_hat, hessian = w.cpu(), w_hat.cpu(), hessian.cpu()
        h = hessian.double()
        wd = w.double()
        d = wd - w_hat.double()
        num = float(((d @ h) * d).sum())
        den = float(((wd @ h) * wd).sum())
    return num / den if den > 0 else 0.0


@dataclass
class PrunedLayer:
    """One pruned weight ``[out, in]``.

    ``weight`` is the pruned weight in the input's dtype (for SparseGPT with the error compensation
    applied to the kept weights; in joint mode every kept weight lies on ``quantized``'s grid and
    ``dequantize(quantized) == weight`` exactly). ``mask`` is the bool keep-mask (True = kept); every
    pruned position of ``weight`` is 0 (a kept weight may also be 0, e.g. on a dead input channel).
    """

    name: str
    method: str
    pattern: str
    weight: torch.Tensor
    mask: torch.Tensor
    target_sparsity: float
    achieved_sparsity: float
    """Pruned fraction of the mask (exact counts: equal to the target up to rounding per row for
    Wanda / row scope, per layer for magnitude / layer scope and SparseGPT, 1 - n/m for N:M)."""
    reconstruction_error: float | None
    """Relative output error ``||(W - W_hat) X^T||^2 / ||W X^T||^2`` on the calibration inputs (None
    when no Hessian was available)."""
    seconds: float
    quantized: QuantizedTensor | None = None
    damp: float = 0.0
    dead_channels: int = 0
    extra: dict = field(default_factory=dict)
    kept_count: int | None = None
    """Kept weights, recorded by :meth:`slim` (the mask is then on the meta device)."""

    @property
    def kept(self) -> int:
        return int(self.mask.sum()) if self.kept_count is None else self.kept_count

    def slim(self) -> PrunedLayer:
        """A copy without tensor memory (the mask on the meta device, its count kept): what a streamed job
        keeps of a module once its layer is written."""
        import dataclasses

        return dataclasses.replace(self, mask=self.mask.to("meta"), weight=None, quantized=None, kept_count=self.kept)

    def to_24(self) -> tuple[torch.Tensor, torch.Tensor]:
        """calibra's compressed 2:4 form ``(values [out, in/2], meta int16 [out, in/16])`` of ``weight``
        (:func:`calibra.ops.compress_24`), for calibra's sparse kernels."""
        if self.pattern != "2:4":
            raise ValueError(
                f"[prune] {self.name} was pruned with pattern {self.pattern}; the compressed 2:4 form needs pattern 2:4"
            )
        return compress_24(self.weight)

    def log(self) -> dict:
        """The report row (no tensors)."""
        return {
            "module": self.name,
            "method": self.method,
            "pattern": self.pattern,
            "target_sparsity": self.target_sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "reconstruction_error": self.reconstruction_error,
            "seconds": self.seconds,
            "damp": self.damp,
            "dead_channels": self.dead_channels,
            "quantized_bits": None if self.quantized is None else self.quantized.bits,
            **self.extra,
        }
