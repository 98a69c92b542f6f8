"""The PruningStage state machine: where a pruning run is, for the progress display and the report.

Idle -> Calibrating -> ComputingImportance -> Pruning -> FineTuning -> Evaluating -> Exporting -> Complete,
and Failed from any stage that is not final. Optional stages may be skipped (magnitude needs no
Calibrating; FineTuning, Evaluating and Exporting are each optional), and two loops exist:
Pruning -> Calibrating (the data-only gradual mode recalibrates between steps) and
FineTuning -> ComputingImportance (a training schedule prunes again at its next step).
Any other transition raises ValueError naming both stages, so a driver bug cannot silently produce
an inconsistent report.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class PruningStage(str, enum.Enum):
    IDLE = "idle"
    CALIBRATING = "calibrating"
    COMPUTING_IMPORTANCE = "computing_importance"
    PRUNING = "pruning"
    FINE_TUNING = "fine_tuning"
    EVALUATING = "evaluating"
    EXPORTING = "exporting"
    COMPLETE = "complete"
    FAILED = "failed"


S = PruningStage
FINAL = frozenset({S.COMPLETE, S.FAILED})
TRANSITIONS: dict[PruningStage, frozenset] = {
    S.IDLE: frozenset({S.CALIBRATING, S.COMPUTING_IMPORTANCE}),
    S.CALIBRATING: frozenset({S.COMPUTING_IMPORTANCE}),
    S.COMPUTING_IMPORTANCE: frozenset({S.PRUNING}),
    S.PRUNING: frozenset({S.CALIBRATING, S.COMPUTING_IMPORTANCE, S.FINE_TUNING, S.EVALUATING, S.EXPORTING, S.COMPLETE}),
    S.FINE_TUNING: frozenset({S.COMPUTING_IMPORTANCE, S.EVALUATING, S.EXPORTING, S.COMPLETE}),
    S.EVALUATING: frozenset({S.EXPORTING, S.COMPLETE}),
    S.EXPORTING: frozenset({S.COMPLETE}),
    S.COMPLETE: frozenset(),
    S.FAILED: frozenset(),
}


class StageTracker:
    """Current stage, the ordered history with timestamps and durations, and the failure reason.

    ``on_change(old, new, tracker)`` (optional) is called after every transition -- the progress display
    hooks in there. ``clock`` is injectable for tests.
    """

    def __init__(self, on_change: Callable | None = None, clock: Callable[[], float] = time.time):
        self._clock = clock
        self.on_change = on_change
        self.stage = S.IDLE
        self.reason: str | None = None
        self.history: list[dict] = [{"stage": S.IDLE.value, "started": clock(), "ended": None, "detail": None}]

    def advance(self, stage: PruningStage | str, detail: str | None = None) -> StageTracker:
        new = PruningStage(stage)
        if new is S.FAILED:
            raise ValueError("[prune] use fail(reason) to enter the failed stage")
        if new not in TRANSITIONS[self.stage]:
            allowed = ", ".join(s.value for s in sorted(TRANSITIONS[self.stage], key=list(S).index)) or "none"
            raise ValueError(
                f"[prune] invalid stage transition {self.stage.value} -> {new.value}; from "
                f"{self.stage.value} the allowed next stages are: {allowed}"
            )
        self._enter(new, detail)
        return self

    def fail(self, reason: str) -> StageTracker:
        if self.stage in FINAL:
            raise ValueError(f"[prune] the run is already {self.stage.value}; cannot fail it ({reason})")
        self.reason = str(reason)
        self._enter(S.FAILED, self.reason)
        return self

    def _enter(self, new: PruningStage, detail: str | None) -> None:
        now = self._clock()
        self.history[-1]["ended"] = now
        old, self.stage = self.stage, new
        self.history.append(
            {"stage": new.value, "started": now, "ended": now if new in FINAL else None, "detail": detail}
        )
        if self.on_change is not None:
            self.on_change(old, new, self)

    @property
    def done(self) -> bool:
        return self.stage in FINAL

    def seconds(self) -> dict[str, float]:
        """Total seconds spent in each stage (loops add up); the running stage counts until now."""
        out: dict[str, float] = {}
        now = self._clock()
        for h in self.history:
            end = h["ended"] if h["ended"] is not None else now
            out[h["stage"]] = out.get(h["stage"], 0.0) + (end - h["started"])
        return out

    def to_dict(self) -> dict:
        """For report.json: the final stage, the failure reason, the history and per-stage seconds."""
        return {
            "stage": self.stage.value,
            "reason": self.reason,
            "history": [dict(h) for h in self.history],
            "seconds": self.seconds(),
        }
