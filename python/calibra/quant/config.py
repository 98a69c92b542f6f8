"""Quantization configs: plain dataclasses, validated (``validate()``) before any weight is loaded.

Every error starts with ``[quantize]``, names the config field, what came and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

FP4_GROUP = {"mxfp4": 32, "nvfp4": 16}
FORMATS = ("int", "mxfp4", "nvfp4", "fp8")
CLIP_METRICS = ("weight", "output")
"""What the clipping search minimizes per group: "weight" = squared weight error (AutoGPTQ's); "output" =
the error weighted by each input channel's activation energy, guarded by the measured layer output error
(see :mod:`calibra.quant.clip_search`)."""


def _fail(cls: str, msg: str) -> None:
    raise ValueError(f"[quantize] {cls}.{msg}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_grid(
    cls: str, bits, group_size, sym, format, mse_clip, mse_grid, mse_maxshrink, clip_metric="weight"
) -> None:
    if format not in FORMATS:
        _fail(cls, f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "int":
        if not _is_int(bits) or not 2 <= bits <= 8:
            _fail(cls, f"bits must be an int in [2, 8] for format 'int', got {bits!r}; use 2..8 (4 is usual)")
        if not _is_int(group_size) or not (group_size == -1 or group_size >= 1):
            _fail(
                cls,
                f"group_size must be -1 (one group per row) or a positive int such as 32, 64, 128, got {group_size!r}",
            )
    elif format == "fp8":
        # FP8 E4M3 weights, one scale per output channel (compressed-tensors' FP8 schemes; calibra.quant.fp8)
        if bits != 8:
            _fail(cls, f"bits must be 8 for fp8 (E4M3), got {bits!r}")
        if group_size != -1:
            _fail(cls, f"group_size must be -1 for fp8 (one scale per output channel), got {group_size!r}")
        if sym is not True:
            _fail(cls, f"sym must be True for fp8 (E4M3 is symmetric), got {sym!r}")
        if mse_clip:
            _fail(cls, "mse_clip is not implemented for fp8 (the scale is absmax / 448); drop it")
    else:
        want = FP4_GROUP[format]
        if bits != 4:
            _fail(cls, f"bits must be 4 for {format}, got {bits!r}")
        if group_size != want:
            _fail(cls, f"group_size must be {want} for {format} (the format's scale group), got {group_size!r}")
        if sym is not True:
            _fail(cls, f"sym must be True for {format} (FP4 is symmetric), got {sym!r}")
    if not isinstance(sym, bool):
        _fail(cls, f"sym must be a bool, got {sym!r}")
    if not isinstance(mse_clip, bool):
        _fail(cls, f"mse_clip must be a bool, got {mse_clip!r}")
    if not _is_int(mse_grid) or not 1 <= mse_grid <= 1000:
        _fail(cls, f"mse_grid must be an int in [1, 1000], got {mse_grid!r}")
    if not isinstance(mse_maxshrink, (int, float)) or not 0.0 < mse_maxshrink < 1.0:
        _fail(
            cls,
            f"mse_maxshrink must be in (0, 1) (the largest fraction of the range clipped away), got {mse_maxshrink!r}",
        )
    if clip_metric not in CLIP_METRICS:
        _fail(cls, f"clip_metric must be one of {', '.join(CLIP_METRICS)}, got {clip_metric!r}")
    if clip_metric == "output" and not mse_clip:
        _fail(cls, "clip_metric 'output' ranks the clipping search's candidates: it needs mse_clip=True")


def _check_awq(cls: str, awq, awq_grid, format: str) -> None:
    if not isinstance(awq, bool):
        _fail(cls, f"awq must be a bool, got {awq!r}")
    if not _is_int(awq_grid) or not 1 <= awq_grid <= 1000:
        _fail(cls, f"awq_grid must be an int in [1, 1000] (alphas k / grid), got {awq_grid!r}; 20 is usual")
    if awq and format == "fp8":
        _fail(cls, "awq is not implemented for fp8 (per-channel E4M3); use format 'int', 'mxfp4' or 'nvfp4'")


def _check_gptaq(cls: str, gptaq, alpha, awq: bool) -> None:
    if not isinstance(gptaq, bool):
        _fail(cls, f"gptaq must be a bool, got {gptaq!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        _fail(
            cls,
            f"gptaq_alpha must be in (0, 1] (the share of the correction), got {alpha!r}; 0.25 is usual",
        )
    if gptaq and awq:
        # AWQ folds its scales into the layer inside the solve step, after the full-precision inputs were
        # recorded: the two input streams would then be in different scalings
        _fail(cls, "gptaq and awq are not combined yet (AWQ rescales the inputs the cross statistic pairs); use one")


def shrink_factors(mse_clip: bool, mse_grid: int, mse_maxshrink: float, format: str = "int") -> list[float]:
    """Clipping candidates p = 1 - k / grid for k < maxshrink * grid (AutoGPTQ's grid); [1.0] without
    the search. The candidate with the least squared error per group wins (ties: the first).
    MXFP4 also tries p = 2, one E8M0 exponent up: the OCP rule floor(log2 amax) - 2 saturates values
    in (6, 8) x 2^e, and for such groups the coarser, unclipped scale can be the better one."""
    if not mse_clip:
        return [1.0]
    grid = [1.0 - k / mse_grid for k in range(max(1, int(mse_maxshrink * mse_grid)))]
    return grid + [2.0] if format == "mxfp4" else grid


def _group_problem(group_size: int, name: str, in_features: int, format: str = "int") -> str | None:
    """Integer groups that do not divide in_features leave a ragged last group (the reference GPTQ's
    layout; docs/quantize.md), so only FP4's fixed scale blocks can refuse a width."""
    if format in FP4_GROUP and in_features % group_size:
        return (
            f"{format} needs in_features divisible by its scale block {group_size}, layer {name} has "
            f"{in_features} (FP4 scale blocks are never ragged: engines' FP4 kernels read whole blocks); "
            f"use format 'int' (a ragged last group is fine there) or leave this layer dense"
        )
    return None


@dataclass(frozen=True)
class RTNConfig:
    """Round-to-nearest: integer 2..8 bits (sym/asym, groups) or FP4 (MXFP4/NVFP4), optionally with
    MSE-searched clipping (per group, the shrink factor of the range with the least squared error).
    ``clip_metric="output"`` ranks the clips by the Hessian-diagonal-weighted error instead (RTN then
    needs calibration Hessians: :attr:`needs_hessian`). ``awq``: AWQ's per-channel scales searched per layer
    on calibration Hessians (``awq_grid`` alphas) and folded into the model before rounding
    (:mod:`calibra.quant.awq`; also needs Hessians)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    format: str = "int"
    mse_clip: bool = False
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    clip_metric: str = "weight"
    awq: bool = False
    awq_grid: int = 20

    method = "rtn"

    def validate(self) -> RTNConfig:
        _check_grid(
            "RTNConfig",
            self.bits,
            self.group_size,
            self.sym,
            self.format,
            self.mse_clip,
            self.mse_grid,
            self.mse_maxshrink,
            self.clip_metric,
        )
        _check_awq("RTNConfig", self.awq, self.awq_grid, self.format)
        return self

    @property
    def clip_on_output(self) -> bool:
        """True when the clipping search ranks its candidates by the output error (reads the Hessian)."""
        return self.mse_clip and self.clip_metric == "output"

    @property
    def needs_hessian(self) -> bool:
        """True when the job reads calibration Hessians (the output-error clipping search, or AWQ's scale
        search: :mod:`calibra.quant.awq`)."""
        return self.clip_on_output or self.awq

    def shrink(self) -> list[float]:
        return shrink_factors(self.mse_clip, self.mse_grid, self.mse_maxshrink, self.format)

    def layer_problem(self, name: str, in_features: int) -> str | None:
        return _group_problem(self.group_size, name, in_features, self.format)


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ with every AutoGPTQ option.

    - ``desc_act``: act-order, columns processed by descending diag(H) (ties by index); ``g_idx``
      records each column's group. With ``static_groups`` the groups are fitted on the unpermuted W
      before the sweep (AutoGPTQ's rule), so groups stay contiguous and no g_idx is needed.
    - ``damp_percent``: damping = damp_percent x mean(diag H) over live channels; on a failed Cholesky
      each ``damp_ladder`` value is tried in turn, then the whole ladder again in float64; past the
      last, the module fails (never silently).
    - ``block_size``: columns per lazy batch (rounded down to a multiple of group_size, or up to
      group_size when larger, so that every group lies within one block).
    - ``true_sequential``: for the calibration runner (quantize a layer's sub-modules in execution
      order, re-collecting inputs in between); the single-layer solver does not read it.
    - ``format``: "int", or "mxfp4"/"nvfp4" for GPTQ onto an FP4 grid (MR-GPTQ adds the rotation).
    - ``mse_clip``: MSE-searched clipping of each group's range, fitted in the sweep.
    - ``clip_metric``: "weight" (AutoGPTQ's squared weight error) or "output": each group's clip is
      ranked by its error weighted per column (diag H for tables fitted before the sweep, GPTQ's
      1 / U[j, j]^2 inside it), and the layer keeps the unclipped solve when that has the lower measured
      output error (:mod:`calibra.quant.clip_search`).
    - ``gptaq``: GPTAQ (Li et al., 2025; "GPTQv2"): the solve also corrects for the difference between
      the quantized model's inputs of the Linear and the full-precision model's, from the cross statistic
      the runner collects beside the Hessian (:mod:`calibra.quant.gptaq`). ``gptaq_alpha`` scales that
      correction (the paper's 0.25). ``gptaq_choose``: solve each Linear both ways (the factorization
      shared) and keep whichever has the lower measured asymmetric error ``||Q X~ - W X||^2`` on the
      calibration tokens, recorded per module (``ModuleLog.choice``; the ``best`` preset).
    - ``choose_clip``: each Linear is also solved with the weight-MSE clip search toggled, and the solve with
      the lower measured error is kept (the scales change, the layout not): with ``gptaq_choose`` four
      candidates (``gptq``, ``gptaq``, ``gptq+mse``, ``gptaq+mse``) by the asymmetric error; without a cross
      statistic (plain GPTQ, MoE experts under GPTAQ) two (``gptq``, ``gptq+mse``) by ``tr((W-Q)H(W-Q)^T)``.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    damp_ladder: tuple = (0.1, 1.0, 10.0)
    block_size: int = 128
    true_sequential: bool = True
    format: str = "int"
    mse_clip: bool = False
    mse_grid: int = 100
    mse_maxshrink: float = 0.8
    clip_metric: str = "weight"
    awq: bool = False
    awq_grid: int = 20
    gptaq: bool = False
    gptaq_alpha: float = 0.25
    gptaq_choose: bool = False
    choose_clip: bool = False

    method = "gptq"

    def validate(self, allow_g_idx: bool = True) -> GPTQConfig:
        """Raise ValueError for any bad field. ``allow_g_idx=False`` says the target format/kernel cannot
        express act-order's g_idx: desc_act then needs static_groups=True (FAULTS row 12)."""
        cls = type(self).__name__
        if self.format == "fp8":
            _fail(cls, "format 'fp8' is round-to-nearest only (RTNConfig, or --scheme fp8 / fp8-dynamic)")
        _check_grid(
            cls,
            self.bits,
            self.group_size,
            self.sym,
            self.format,
            self.mse_clip,
            self.mse_grid,
            self.mse_maxshrink,
            self.clip_metric,
        )
        _check_awq(cls, self.awq, self.awq_grid, self.format)
        _check_gptaq(cls, self.gptaq, self.gptaq_alpha, self.awq)
        if not isinstance(self.gptaq_choose, bool):
            _fail(cls, f"gptaq_choose must be a bool, got {self.gptaq_choose!r}")
        if self.gptaq_choose and not self.gptaq:
            _fail(cls, "gptaq_choose chooses between GPTAQ and GPTQ per Linear: it needs gptaq=True")
        if not isinstance(self.choose_clip, bool):
            _fail(cls, f"choose_clip must be a bool, got {self.choose_clip!r}")
        if self.choose_clip and (self.mse_clip and self.clip_metric == "output"):
            _fail(cls, "choose_clip toggles the weight-MSE clip; it does not combine with clip_metric='output'")
        for f in ("desc_act", "static_groups", "true_sequential"):
            if not isinstance(getattr(self, f), bool):
                _fail(cls, f"{f} must be a bool, got {getattr(self, f)!r}")
        if not isinstance(self.damp_percent, (int, float)) or not 0.0 < self.damp_percent <= 1.0:
            _fail(
                cls,
                f"damp_percent must be in (0, 1] (a fraction of mean(diag H)), got {self.damp_percent!r}; "
                f"0.01 is usual",
            )
        ladder = tuple(self.damp_ladder)
        if (
            any(not isinstance(v, (int, float)) for v in ladder)
            or any(b <= a for a, b in zip((self.damp_percent,) + ladder, ladder))
            or len(ladder) > 8
            or (ladder and ladder[-1] > 100.0)
        ):
            _fail(
                cls,
                f"damp_ladder must be at most 8 increasing values above damp_percent {self.damp_percent} and "
                f"at most 100, got {self.damp_ladder!r}; e.g. (0.1, 1.0, 10.0)",
            )
        if not _is_int(self.block_size) or not 1 <= self.block_size <= 4096:
            _fail(cls, f"block_size must be an int in [1, 4096], got {self.block_size!r}; 128 is usual")
        if self.desc_act and not self.static_groups and self.group_size != -1:
            if self.format != "int":
                _fail(
                    cls,
                    f"desc_act with format {self.format} needs static_groups=True: FP4 scales cover fixed "
                    f"runs of {self.group_size} columns and cannot follow act-order's g_idx",
                )
            if not allow_g_idx:
                _fail(
                    cls,
                    "desc_act needs static_groups=True for this export format, which cannot express act-order's g_idx",
                )
        return self

    @property
    def uses_g_idx(self) -> bool:
        """True when the result carries a non-trivial g_idx (act-order with dynamic groups)."""
        return self.desc_act and not self.static_groups and self.group_size != -1

    def shrink(self) -> list[float]:
        return shrink_factors(self.mse_clip, self.mse_grid, self.mse_maxshrink, self.format)

    def layer_problem(self, name: str, in_features: int) -> str | None:
        return _group_problem(self.group_size, name, in_features, self.format)


@dataclass(frozen=True)
class MRGPTQConfig:
    """MR-GPTQ (Micro-Rotated GPTQ): a block-wise Hadamard rotation of the input dimension whose block
    equals the FP4 scale group (16 for NVFP4, 32 for MXFP4), GPTQ in the rotated space onto the FP4
    grid, and MSE-searched group scales. The result records the rotation, so evaluation and export
    apply ``x -> hadamard(x, block_size)`` before the rotated weight.

    ``choose`` (default on): per Linear, the rotated solve competes with the unrotated one and with RTN;
    the candidate with the least measured output error on the calibration Hessian is kept and recorded
    (``ModuleLog.choice``), so the rotation is applied only where it helps (:mod:`calibra.quant.mr_gptq`).
    ``candidates``: ``"quick"`` (the default: rotated and unrotated GPTQ with the config's scale search,
    and RTN -- about 2-3x the rotated solve alone) or ``"all"`` (each GPTQ also with every FP4 scale
    search: none, weight MSE, output MSE -- 7 candidates, tens of times slower). ``choose=False`` is the
    paper's method alone (every Linear rotated, the config's clip search)."""

    format: str = "mxfp4"
    mse: bool = True
    mse_grid: int = 100
    mse_maxshrink: float = 0.3
    clip_metric: str = "weight"
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    damp_ladder: tuple = (0.1, 1.0, 10.0)
    block_size: int = 128
    true_sequential: bool = True
    choose: bool = True
    candidates: str = "quick"

    method = "mr_gptq"

    @property
    def rotation_block(self) -> int:
        return FP4_GROUP.get(self.format, 0)

    def gptq(self) -> GPTQConfig:
        """The GPTQ config run in the rotated space."""
        return GPTQConfig(
            bits=4,
            group_size=FP4_GROUP[self.format],
            sym=True,
            desc_act=self.desc_act,
            static_groups=self.static_groups,
            damp_percent=self.damp_percent,
            damp_ladder=tuple(self.damp_ladder),
            block_size=self.block_size,
            true_sequential=self.true_sequential,
            format=self.format,
            mse_clip=self.mse,
            mse_grid=self.mse_grid,
            mse_maxshrink=self.mse_maxshrink,
            clip_metric=self.clip_metric,
        )

    def validate(self, allow_g_idx: bool = True) -> MRGPTQConfig:
        if self.format not in FP4_GROUP:
            _fail("MRGPTQConfig", f"format must be 'mxfp4' or 'nvfp4', got {self.format!r}")
        if not isinstance(self.mse, bool):
            _fail("MRGPTQConfig", f"mse must be a bool, got {self.mse!r}")
        if not isinstance(self.choose, bool):
            _fail("MRGPTQConfig", f"choose must be a bool, got {self.choose!r}")
        if self.candidates not in ("quick", "all"):
            _fail("MRGPTQConfig", f"candidates must be 'quick' or 'all', got {self.candidates!r}")
        try:
            self.gptq().validate(allow_g_idx)
        except ValueError as e:
            raise ValueError(str(e).replace("GPTQConfig.", "MRGPTQConfig.").replace("mse_clip", "mse")) from None
        return self

    def layer_problem(self, name: str, in_features: int) -> str | None:
        b = self.rotation_block
        if in_features % b:
            return (
                f"{self.format} needs in_features divisible by {b}, layer {name} has {in_features}; "
                f"leave this layer dense or use format 'int'"
            )
        return None


def check_layers(config, layers: Mapping[str, int]) -> None:
    """Raise one ValueError listing every layer (name -> in_features) the config cannot quantize
    (FAULTS row 11: fail before calibration, all layers at once)."""
    problems = [p for name, n in layers.items() if (p := config.layer_problem(name, n)) is not None]
    if problems:
        raise ValueError(
            f"[quantize] {len(problems)} layer(s) cannot be quantized with "
            f"{type(config).__name__}:\n  " + "\n  ".join(problems)
        )


__all__ = ["RTNConfig", "GPTQConfig", "MRGPTQConfig", "check_layers", "shrink_factors", "FP4_GROUP"]
