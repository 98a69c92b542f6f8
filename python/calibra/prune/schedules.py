"""Pruning schedules: the sparsity a layer should have at training step ``t``.

All three share one interface: ``sparsity_at_step(t)`` and ``is_prune_step(t)`` (the steps at which
masks are recomputed), plus ``final`` (the sparsity reached at the end) and ``with_final(s)`` (the
schedule with an unset final sparsity filled in from :class:`~calibra.prune.config.PruningConfig`).
Before pruning starts the model is dense (sparsity 0).

- :class:`OneShot` ``{step}``: 0 before ``step``, the target from ``step`` on.
- :class:`Gradual` ``{start_step, end_step, initial_sparsity, final_sparsity, frequency}``: linear in
  the number of elapsed update steps. With ``T = end_step - start_step`` and
  ``k = floor((t - start_step) / frequency) * frequency`` (the last update step at or before ``t``),
  ``s_t = s_i + (s_f - s_i) * min(k, T) / T`` for ``t >= start_step``; ``s_f`` from ``end_step`` on.
- :class:`Cubic` ``{start_step, end_step, initial_sparsity, final_sparsity, frequency}``: Zhu & Gupta
  (2017), "To prune, or not to prune", eq. 1: ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3``
  for ``t in {t0, t0 + dt, ..., t0 + n dt}``, with ``t0 = start_step``, ``n dt = end_step - start_step``
  and ``dt = frequency``; between update steps the sparsity of the last update holds. The paper starts
  at ``s_i`` (often 0); a nonzero start continues pruning an already-sparse model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


def _check_fraction(cls: str, name: str, v, *, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"[prune] {cls}.{name} must be a fraction in [0, 1), got {v!r}; e.g. 0.5 for 50%")


def _check_step(cls: str, name: str, v, minimum: int = 0) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"[prune] {cls}.{name} must be an int >= {minimum}, got {v!r}")


@dataclass(frozen=True)
class OneShot:
    """Prune once, at ``step`` (0: before any training), to ``sparsity`` (None: the config's target)."""

    step: int = 0
    sparsity: float | None = None

    @property
    def final(self) -> float | None:
        return self.sparsity

    def with_final(self, s: float) -> OneShot:
        return self if self.sparsity is not None else replace(self, sparsity=s)

    def validate(self) -> OneShot:
        _check_step("OneShot", "step", self.step)
        _check_fraction("OneShot", "sparsity", self.sparsity, allow_none=True)
        return self

    def sparsity_at_step(self, t: int) -> float:
        return 0.0 if t < self.step else float(self.sparsity or 0.0)

    def is_prune_step(self, t: int) -> bool:
        return t == self.step

    def prune_steps(self) -> list[int]:
        return [self.step]


@dataclass(frozen=True)
class _Ramp:
    start_step: int = 0
    end_step: int = 1000
    initial_sparsity: float = 0.0
    final_sparsity: float | None = None
    frequency: int = 100

    @property
    def final(self) -> float | None:
        return self.final_sparsity

    def with_final(self, s: float):
        return self if self.final_sparsity is not None else replace(self, final_sparsity=s)

    def validate(self):
        cls = type(self).__name__
        _check_step(cls, "start_step", self.start_step)
        _check_step(cls, "end_step", self.end_step)
        _check_step(cls, "frequency", self.frequency, 1)
        if self.end_step <= self.start_step:
            raise ValueError(
                f"[prune] {cls} needs end_step > start_step, got start_step {self.start_step} and "
                f"end_step {self.end_step}"
            )
        _check_fraction(cls, "initial_sparsity", self.initial_sparsity)
        _check_fraction(cls, "final_sparsity", self.final_sparsity, allow_none=True)
        if self.final_sparsity is not None and self.final_sparsity < self.initial_sparsity:
            raise ValueError(
                f"[prune] {cls} needs final_sparsity >= initial_sparsity, got {self.final_sparsity} < "
                f"{self.initial_sparsity}"
            )
        return self

    def _progress(self, t: int) -> float | None:
        """Fraction of the ramp done at the last update step at or before ``t``; None before the start."""
        if t < self.start_step:
            return None
        span = self.end_step - self.start_step
        if t >= self.end_step:
            return 1.0
        k = (t - self.start_step) // self.frequency * self.frequency
        return min(k, span) / span

    def is_prune_step(self, t: int) -> bool:
        if t < self.start_step or t > self.end_step:
            return False
        return t == self.end_step or (t - self.start_step) % self.frequency == 0

    def prune_steps(self) -> list[int]:
        steps = list(range(self.start_step, self.end_step, self.frequency))
        return steps + [self.end_step]


@dataclass(frozen=True)
class Gradual(_Ramp):
    """Linear ramp from ``initial_sparsity`` at ``start_step`` to ``final_sparsity`` at ``end_step``,
    updated every ``frequency`` steps."""

    def sparsity_at_step(self, t: int) -> float:
        p = self._progress(t)
        if p is None:
            return 0.0
        s_f = float(self.final_sparsity or 0.0)
        return self.initial_sparsity + (s_f - self.initial_sparsity) * p


@dataclass(frozen=True)
class Cubic(_Ramp):
    """Zhu & Gupta's cubic ramp: fast pruning early (when redundancy is high), slow near the target."""

    def sparsity_at_step(self, t: int) -> float:
        p = self._progress(t)
        if p is None:
            return 0.0
        s_f = float(self.final_sparsity or 0.0)
        return s_f + (self.initial_sparsity - s_f) * (1.0 - p) ** 3


Schedule = OneShot | Gradual | Cubic
