"""The process's own memory, measured: resident set size now, its high-water mark, and peaks per phase of a
job (for the report beside the plan's prediction, ``calibra.jobs.plan``). Imports nothing from calibra, so the
planner, the streamed output and the report all read memory the same way."""

from __future__ import annotations

import os


def current_rss() -> int:
    """Resident set size of this process now (bytes); 0 when the platform does not say."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if os.uname().sysname == "Darwin" else 1024)
    except Exception:  # pragma: no cover
        return 0


def proc_kib(path: str, field: str) -> int | None:
    """``field`` of a /proc file in ``Name:  N kB`` lines (``/proc/meminfo``, ``/proc/self/status``), in
    bytes; None where the file or the field is missing (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss() -> int | None:
    """The process's resident high-water mark (VmHWM, bytes); None where /proc does not say (not Linux)."""
    return proc_kib("/proc/self/status", "VmHWM")


class PhasePeaks:
    """Measured peak host memory per phase of a job, set beside the plan's phases in the report.

    ``mark(phase)`` ends a phase. When the kernel's high-water mark (VmHWM) rose during the phase, that is
    the phase's peak, exactly. When it did not, the phase stayed below an earlier one, and its peak is the
    largest RSS a sampling thread saw (every ``interval`` seconds: a lower bound that can miss a spike
    shorter than that). The high-water mark is never reset: resetting it (/proc/self/clear_refs) would
    also lower what ``getrusage`` and a parent's ``wait4`` report as the process's peak, which the
    benchmarks read. :meth:`into` hands the phases to the report, which closes the last one when it is
    written (``calibra.report``); nothing is recorded where /proc does not exist."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.peaks: dict[str, int] = {}
        self.exact: dict[str, bool] = {}
        self._hwm = peak_rss()
        self.ok = self._hwm is not None
        self._sampled = current_rss()
        self._stop = threading.Event()
        if self.ok:
            threading.Thread(target=self._sample, args=(interval,), daemon=True, name="calibra-rss").start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._sampled = max(self._sampled, current_rss())

    def mark(self, phase: str) -> None:
        if not self.ok:
            return
        hwm = peak_rss() or 0
        exact = hwm > self._hwm
        peak = hwm if exact else max(self._sampled, current_rss())
        self._hwm, self._sampled = hwm, current_rss()
        if peak >= self.peaks.get(phase, 0):
            self.peaks[phase], self.exact[phase] = peak, exact

    def into(self, report: dict, open_phase: str) -> None:
        """``report["measured"]``: the phases so far, and where the last one (``open_phase``) started from;
        stops the sampling thread."""
        self._stop.set()
        if self.ok:
            report.setdefault("measured", {}).update(
                phases=dict(self.peaks),
                phases_exact=dict(self.exact),
                open_phase=open_phase,
                open_phase_from=int(self._hwm),
            )


__all__ = ["current_rss", "peak_rss", "proc_kib", "PhasePeaks"]
