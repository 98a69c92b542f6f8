"""PruningConfig: what to prune, how far, in which pattern, on which schedule -- checked by
``validate()`` before any weight is loaded (FAULTS 13), with per-layer checks (FAULTS 11) that run on
shapes alone.

Strings accepted:

- ``method``: ``"magnitude"`` (|w|, or w^2 with ``magnitude_score="square"``), ``"wanda"``
  (|w_ij| * ||X_j||_2) or ``"sparsegpt"`` (OBS column sweep with the Hessian).
- ``pattern``: ``"unstructured"``; ``"2:4"``, ``"4:8"`` or any ``"n:m"`` (n kept of every m consecutive
  input channels); ``"block:RxC"`` / ``"block:R"`` (whole R x C tiles of the ``[out, in]`` weight).
- ``scope`` (None = the method's default): ``"row"`` compares scores within each output row (Wanda's
  rule and default; for blocks, within each row of tiles), ``"layer"`` across the whole matrix
  (magnitude's default). SparseGPT selects per sweep block of columns and ignores ``scope``.

``target_sparsity`` is the fraction of weights set to zero. For N:M it is fixed at ``1 - n/m``: leave
it None or give exactly that value.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from calibra.prune.patterns import NM, SCOPES, Block, Pattern, Unstructured, parse_pattern
from calibra.prune.schedules import Cubic, Gradual, OneShot, Schedule


class PruneMethod(str, enum.Enum):
    MAGNITUDE = "magnitude"
    WANDA = "wanda"
    SPARSEGPT = "sparsegpt"


METHODS = tuple(m.value for m in PruneMethod)
MAGNITUDE_SCORES = ("abs", "square")
JOINT_BITS = (2, 3, 4, 8)


def _fail(msg: str) -> None:
    raise ValueError(f"[prune] {msg}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class JointQuant:
    """Quantize SparseGPT's kept weights in the same sweep (the SparseGPT paper's joint mode), on the
    integer grid of :func:`calibra.ops.quantize` (GPTQ convention): ``w ~ (code - zero) * scale``.
    ``group_size`` -1 = one group per row (fitted on the whole W before the sweep, as SparseGPT does);
    otherwise each group is fitted from the current, error-updated columns at its first column."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True

    def validate(self) -> JointQuant:
        if not _is_int(self.bits) or not 2 <= self.bits <= 8:
            _fail(f"JointQuant.bits must be an int in [2, 8], got {self.bits!r}; 4 is usual")
        if not _is_int(self.group_size) or not (self.group_size == -1 or self.group_size >= 1):
            _fail(
                f"JointQuant.group_size must be -1 (one group per row) or a positive int such as 128, got "
                f"{self.group_size!r}"
            )
        if not isinstance(self.sym, bool):
            _fail(f"JointQuant.sym must be a bool, got {self.sym!r}")
        return self


@dataclass(frozen=True)
class PruningConfig:
    """How to prune. See the module docstring for the accepted strings.

    - ``schedule``: :class:`OneShot` (default), :class:`Gradual` or :class:`Cubic`; an unset final
      sparsity takes ``target_sparsity`` (:meth:`resolved_schedule`).
    - ``calibration``: the calibration data spec (a ``calibra.data.CalibrationConfig``, validated with
      the rest when it has a ``validate()``), or None for the API's default; only read when
      :meth:`requires_calibration`.
    - ``gradual_steps``: data-only gradual mode (no training): reach the target in this many pruning
      steps, recalibrating the statistics between steps; 1 = one-shot.
    - ``skip_indivisible``: a layer whose width the pattern does not divide is left dense and recorded
      (FAULTS 11) instead of failing the run.
    - SparseGPT: ``block_size`` (columns per lazy batch), ``damp_percent`` and ``damp_ladder`` (damping
      as a fraction of mean diag H; the ladder is tried in order, then again in float64, when a Cholesky
      fails), ``quantize`` (:class:`JointQuant` for sparse + quantized weights in one sweep).
    """

    method: str = "wanda"
    target_sparsity: float | None = 0.5
    pattern: str | Pattern = "unstructured"
    schedule: Schedule = field(default_factory=OneShot)
    calibration: object | None = None
    scope: str | None = None
    magnitude_score: str = "abs"
    gradual_steps: int = 1
    skip_indivisible: bool = False
    block_size: int = 128
    damp_percent: float = 0.01
    damp_ladder: tuple = (0.1, 1.0, 10.0)
    quantize: JointQuant | None = None

    # -- derived -----------------------------------------------------------------------------------
    @property
    def method_enum(self) -> PruneMethod:
        return PruneMethod(self.method.value if isinstance(self.method, PruneMethod) else self.method)

    @property
    def pattern_obj(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def sparsity(self) -> float:
        """The target sparsity (for N:M: 1 - n/m)."""
        fixed = self.pattern_obj.fixed_sparsity()
        return float(fixed if fixed is not None else self.target_sparsity)

    @property
    def resolved_scope(self) -> str:
        if self.scope is not None:
            return self.scope
        return "layer" if self.method_enum is PruneMethod.MAGNITUDE else "row"

    def resolved_schedule(self) -> Schedule:
        return self.schedule.with_final(self.sparsity)

    def requires_calibration(self) -> bool:
        """Wanda needs per-channel activation norms and SparseGPT the Hessian; magnitude needs no data."""
        return self.method_enum is not PruneMethod.MAGNITUDE

    # -- checks ------------------------------------------------------------------------------------
    def validate(self) -> PruningConfig:
        """Raise ValueError naming the field, what came and the fix. Needs no weights."""
        m = self.method.value if isinstance(self.method, PruneMethod) else self.method
        if m not in METHODS:
            _fail(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        pattern = parse_pattern(self.pattern)
        fixed = pattern.fixed_sparsity()
        ts = self.target_sparsity
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))):
            _fail(f"target_sparsity must be a number in (0, 1), got {ts!r}")
        if fixed is not None:
            if ts is not None and abs(ts - fixed) > 1e-9:
                _fail(
                    f"pattern {pattern} fixes the sparsity at {fixed:g}, but target_sparsity is {ts!r}; leave "
                    f"target_sparsity unset (None) or set it to {fixed:g}"
                )
        elif ts is None or not 0.0 < ts < 1.0:
            _fail(f"target_sparsity must be in (0, 1) (the fraction of weights set to zero), got {ts!r}; e.g. 0.5")
        if self.scope is not None and self.scope not in SCOPES:
            _fail(f"scope must be one of {', '.join(SCOPES)} or None (the method's default), got {self.scope!r}")
        if self.magnitude_score not in MAGNITUDE_SCORES:
            _fail(f"magnitude_score must be 'abs' (|w|) or 'square' (w^2), got {self.magnitude_score!r}")
        if not isinstance(self.schedule, (OneShot, Gradual, Cubic)):
            _fail(f"schedule must be OneShot, Gradual or Cubic, got {type(self.schedule).__name__}")
        self.schedule.validate()
        final = self.schedule.final
        if final is not None and abs(final - self.sparsity) > 1e-9:
            _fail(
                f"the schedule ends at sparsity {final:g} but the target is {self.sparsity:g}; leave the schedule's "
                f"final sparsity unset or make them equal"
            )
        if isinstance(pattern, NM) and not isinstance(self.schedule, OneShot):
            _fail(
                f"pattern {pattern} fixes the sparsity, so it cannot ramp up on a {type(self.schedule).__name__} "
                f"schedule; use OneShot (or an unstructured pattern for gradual pruning)"
            )
        if not _is_int(self.gradual_steps) or not 1 <= self.gradual_steps <= 64:
            _fail(f"gradual_steps must be an int in [1, 64], got {self.gradual_steps!r}; 1 = one-shot")
        if self.gradual_steps > 1 and isinstance(pattern, NM):
            _fail(
                f"gradual_steps > 1 needs a pattern whose sparsity can grow; {pattern} fixes it at "
                f"{pattern.fixed_sparsity():g}"
            )
        if not isinstance(self.skip_indivisible, bool):
            _fail(f"skip_indivisible must be a bool, got {self.skip_indivisible!r}")
        if not _is_int(self.block_size) or not 1 <= self.block_size <= 4096:
            _fail(
                f"block_size must be an int in [1, 4096] (SparseGPT columns per lazy batch), got "
                f"{self.block_size!r}; 128 is usual"
            )
        if (
            isinstance(self.damp_percent, bool)
            or not isinstance(self.damp_percent, (int, float))
            or not 0.0 < self.damp_percent <= 1.0
        ):
            _fail(
                f"damp_percent must be in (0, 1] (a fraction of mean diag H), got {self.damp_percent!r}; 0.01 is usual"
            )
        ladder = tuple(self.damp_ladder)
        if (
            any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in ladder)
            or any(b <= a for a, b in zip((self.damp_percent,) + ladder, ladder))
            or len(ladder) > 8
            or (ladder and ladder[-1] > 100.0)
        ):
            _fail(
                f"damp_ladder must be at most 8 increasing values above damp_percent {self.damp_percent} and at "
                f"most 100, got {self.damp_ladder!r}; e.g. (0.1, 1.0, 10.0)"
            )
        if self.quantize is not None:
            if not isinstance(self.quantize, JointQuant):
                _fail(f"quantize must be a JointQuant or None, got {type(self.quantize).__name__}")
            if self.method_enum is not PruneMethod.SPARSEGPT:
                _fail(
                    f"joint quantization runs inside SparseGPT's sweep; method {m!r} cannot do it; use method "
                    f"'sparsegpt' or quantize afterwards"
                )
            self.quantize.validate()
            if isinstance(pattern, Block):
                _fail("joint quantization is implemented for unstructured and N:M patterns, not blocks")
        if self.calibration is not None and hasattr(self.calibration, "validate"):
            self.calibration.validate()
        return self

    def layer_problem(self, name: str, out_features: int, in_features: int) -> str | None:
        """Why this config cannot prune a layer of this shape (None when it can)."""
        problem = parse_pattern(self.pattern).layer_problem(name, out_features, in_features)
        if (
            problem is None
            and self.quantize is not None
            and self.quantize.group_size != -1
            and in_features % self.quantize.group_size
        ):
            problem = (
                f"joint quantization group_size {self.quantize.group_size} does not divide in_features "
                f"{in_features} (layer {name})"
            )
        return problem

    def plan_layers(self, shapes: Mapping[str, tuple[int, int]] | Iterable[tuple[str, tuple[int, int]]]):
        """Split layers (name -> (out_features, in_features)) into those to prune and those left dense.

        Every layer the pattern cannot handle is listed in one error (FAULTS 11), unless
        ``skip_indivisible`` is set: then they are returned as ``{name: reason}`` for the report and
        stay dense. Runs on shapes alone, so it can run before any weight is loaded.
        """
        items = shapes.items() if isinstance(shapes, Mapping) else shapes
        prune, dense = [], {}
        for name, (o, i) in items:
            problem = self.layer_problem(name, o, i)
            if problem is None:
                prune.append(name)
            else:
                dense[name] = problem
        if dense and not self.skip_indivisible:
            listed = "\n  ".join(dense.values())
            _fail(
                f"{len(dense)} layer(s) cannot take pattern {parse_pattern(self.pattern)}:\n  {listed}\n"
                f"choose a pattern that divides these widths, or set skip_indivisible=True to leave them dense "
                f"(they are recorded in the report)"
            )
        return prune, dense

    def with_(self, **changes) -> PruningConfig:
        return replace(self, **changes)


def config_dict(config: PruningConfig) -> dict:
    """The settings as plain JSON values: ``report.json``'s ``settings.config`` and the resume fingerprint."""
    d = dataclasses.asdict(config)
    d["method"] = config.method_enum.value
    d["pattern"] = str(config.pattern_obj)
    d["schedule"] = {"type": type(config.schedule).__name__, **dataclasses.asdict(config.schedule)}
    d["calibration"] = None if config.calibration is None else repr(config.calibration)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


__all__ = [
    "PruningConfig",
    "config_dict",
    "PruneMethod",
    "JointQuant",
    "METHODS",
    "Unstructured",
    "NM",
    "Block",
    "OneShot",
    "Gradual",
    "Cubic",
    "parse_pattern",
]
