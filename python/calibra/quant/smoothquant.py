"""SmoothQuant migration strength searched per layer on calibration data (``--scheme w8a8``).

SmoothQuant (Xiao et al., 2023) divides a Linear's input channel ``j`` by ``s_j`` and multiplies the
weight's column ``j`` by it: ``y = W x = (W diag(s)) (x / s)``, with
``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)`` (``calibra.calib.observers.smooth_factors``). ``x / s`` is
folded into the RMSNorm that produces ``x`` (``calibra.quant.act_ranges.apply_smoothing``), so the
deployed model runs no extra operation. The fixed ``alpha = 0.5`` of the paper is a compromise; the best
strength differs from layer to layer, and for an int8 input quantized per token it may be none at all.

So each smoothing group (q/k/v behind ``input_layernorm``; the dense MLP's gate/up behind
``post_attention_layernorm``: ``act_ranges.smoothing_groups``) gets its own, measured:

- candidates: **no smoothing** (``s = 1``; SmoothQuant's formula at ``alpha = 0`` is *not* the identity,
  it divides every weight column by its max) and ``alpha`` in 0, 0.1, ..., 1;
- each is scored by the **relative output error** of the group's quantized Linears on a sample of the
  group's calibration inputs ``X`` (at most ``sample_tokens`` unpadded tokens, evenly strided over the
  calibration set): ``||Q_a(X / s) Q_w(W diag(s))^T - X W^T||^2 / ||X W^T||^2`` with ``Q_a`` the scheme's
  int8 input quantization (per token, or one static per-tensor scale: absmax of the whole calibration
  set's smoothed input, or that percentile of the sample's magnitudes) and ``Q_w`` the weights exactly as
  the job will solve them: GPTQ on the candidate's smoothed Hessian ``diag(1/s) H diag(1/s)`` (from the
  whole calibration set; the group's Linears stacked, since GPTQ solves rows independently), or int8 RTN
  per output channel when no Hessian is given;
- the candidate with the least error is kept; no smoothing wins ties, so the search never increases the
  measured error on the calibration data over the unsmoothed model.

``smoothquant="off"`` keeps ``s = 1`` everywhere and ``smoothquant=ALPHA`` uses that fixed strength (the
paper's recipe), both for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibra.quant.int8 import int8_fake_quant, int8_fake_quant_dynamic, int8_scale

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
SAMPLE_TOKENS = 2048
MODES = ("search", "off", "fixed")


@dataclass(frozen=True)
class SmoothConfig:
    """How the smoothing strength of each group is chosen (see the module docstring)."""

    mode: str = "search"
    alpha: float | None = None
    """The strength of mode "fixed"."""
    alphas: tuple = ALPHAS
    sample_tokens: int = SAMPLE_TOKENS

    def validate(self) -> SmoothConfig:
        if self.mode not in MODES:
            raise ValueError(f"[quantize] smoothquant mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "fixed" and not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise ValueError(f"[quantize] smoothquant alpha must be in [0, 1], got {self.alpha!r}")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"[quantize] smoothquant alphas must be values in [0, 1], got {self.alphas!r}")
        if isinstance(self.sample_tokens, bool) or not isinstance(self.sample_tokens, int) or self.sample_tokens < 16:
            raise ValueError(f"[quantize] smoothquant sample_tokens must be an int >= 16, got {self.sample_tokens!r}")
        return self

    @property
    def candidates(self) -> tuple:
        """What is scored per group: None (no smoothing) and the strengths."""
        if self.mode == "off":
            return (None,)
        if self.mode == "fixed":
            return (float(self.alpha),)
        return (None,) + tuple(float(a) for a in self.alphas)

    def to_dict(self) -> dict:
        d = {"mode": self.mode, "sample_tokens": self.sample_tokens}
        if self.mode == "fixed":
            d["alpha"] = self.alpha
        if self.mode == "search":
            d["alphas"] = list(self.alphas)
        return d


def parse_smoothquant(value, act) -> SmoothConfig | None:
    """The :class:`SmoothConfig` of ``smoothquant`` (``"search"``, ``"off"``, a strength in [0, 1], or
    None = the default) for the activation config ``act``: INT8 schemes only (None for every other)."""
    int8 = act is not None and act.format == "int8"
    if value is None:
        return SmoothConfig().validate() if int8 else None
    if not int8:
        raise ValueError(
            f"[quantize] smoothquant={value!r} applies to --scheme w8a8 / w8a8-static only (RTN's SmoothQuant "
            f"is --act-ranges)"
        )
    if value in ("search", "off"):
        return SmoothConfig(mode=value).validate()
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"[quantize] smoothquant must be 'search', 'off' or a strength in [0, 1], got {value!r}"
        ) from None
    return SmoothConfig(mode="fixed", alpha=alpha).validate()


def _int8_weight(w: torch.Tensor, hessian=None, gptq=None) -> torch.Tensor:
    """``w`` quantized to int8 per output channel and dequantized: GPTQ with ``gptq`` (a GPTQConfig) on
    ``hessian = (H sum, tokens)`` when given, else calibra's RTN."""
    if hessian is not None and gptq is not None:
        from calibra.quant.gptq import gptq_quantize

        h, n = hessian
        return gptq_quantize(w, h, n, gptq, name="smoothquant candidate").weight.float()
    from calibra import ops

    return ops.dequantize(ops.quantize(w, bits=8, group_size=-1, symmetric=True))


def _act_quant(xs: torch.Tensor, dynamic: bool, static_amax: torch.Tensor | None, clip_percentile):
    if dynamic:
        return int8_fake_quant_dynamic(xs)
    amax = static_amax
    if clip_percentile is not None:  # the percentile of this sample's magnitudes (a proxy of the histogram's)
        flat = xs.abs().flatten()
        k = max(1, min(flat.numel(), int(round(flat.numel() * clip_percentile / 100.0))))
        amax = torch.minimum(amax, flat.kthvalue(k).values)
    return int8_fake_quant(xs, int8_scale(amax.reshape(1)))


def output_error(
    x: torch.Tensor,
    weights: torch.Tensor,
    s: torch.Tensor | None,
    *,
    dynamic: bool,
    act_amax: torch.Tensor,
    clip_percentile: float | None = None,
    reference: torch.Tensor | None = None,
    hessian=None,
    gptq=None,
) -> float:
    """Relative output error of the int8 group ``weights [out, in]`` (every Linear of the group stacked) on
    the sample ``x [n, in]`` smoothed by ``s [in]`` (None = unsmoothed); ``act_amax [in]``: each channel's
    absmax over the whole calibration set (the static scale's input); ``hessian``: ``(H sum [in, in], tokens)``
    of the unsmoothed inputs, with ``gptq`` a GPTQConfig, to score GPTQ's weights instead of RTN's."""
    x, w = x.float(), weights.float()
    ref = x @ w.T if reference is None else reference
    if s is not None:
        x, w, act_amax = x / s, w * s, act_amax / s
        if hessian is not None:
            hessian = (hessian[0].float() / s[:, None] / s[None, :], hessian[1])
    xq = _act_quant(x, dynamic, act_amax.max(), clip_percentile)
    err = (xq @ _int8_weight(w, hessian, gptq).T - ref).pow(2).sum()
    return float(err / ref.pow(2).sum().clamp_min(1e-30))


def search(
    x: torch.Tensor,
    act_amax: torch.Tensor,
    weights: torch.Tensor,
    config: SmoothConfig,
    *,
    dynamic: bool,
    clip_percentile: float | None = None,
    hessian=None,
    gptq=None,
) -> tuple[float | None, torch.Tensor | None, dict]:
    """``(kept alpha or None, its factors s [in] or None, {candidate: relative error})`` for one group (see
    the module docstring). ``x``: the group's input sample; ``act_amax``: per-channel absmax over all
    calibration tokens; ``weights``: the group's weights stacked ``[out, in]``; ``hessian``, ``gptq``: see
    :func:`output_error`."""
    from calibra.calib.observers import smooth_factors

    x, w, amax = x.float(), weights.float(), act_amax.float()
    ref = x @ w.T
    errors: dict = {}
    best = (None, None, float("inf"))
    for alpha in config.candidates:
        s = None if alpha is None else smooth_factors(amax, w, alpha)
        e = output_error(
            x, w, s, dynamic=dynamic, act_amax=amax, clip_percentile=clip_percentile, reference=ref,
            hessian=hessian, gptq=gptq,
        )  # fmt: skip
        errors["off" if alpha is None else f"{alpha:g}"] = e
        if e < best[2]:  # strict: the earlier candidate (no smoothing first) wins a tie
            best = (alpha, s, e)
    return best[0], best[1], errors


__all__ = ["ALPHAS", "SAMPLE_TOKENS", "SmoothConfig", "parse_smoothquant", "output_error", "search"]
