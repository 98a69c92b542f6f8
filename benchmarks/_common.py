"""Shared timing helpers for calibra's benchmark scripts.

Rules (../shared/TARGETS.md, "How to measure"): warm up, synchronize the device, take the median of
repeated runs, and print ratios against the pure-torch reference and against a roofline baseline
measured in the same process, so a noisy shared machine cannot fake a win.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def median_seconds(fn: Callable[[], object], device: str = "cpu", *, warmup: int = 2, repeat: int = 7) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def clone_seconds(t: torch.Tensor, **kw) -> float:
    """The memory-bound roofline: time of ``t.clone()`` (reads and writes ``t`` once)."""
    return median_seconds(lambda: t.clone(), str(t.device), **kw)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def mean_spread(vals: list[float], fmt: str) -> str:
    """``mean ± sample std`` of ``vals`` with ``fmt`` (the spread unsigned: a ``+`` in ``fmt`` is dropped for it);
    one value alone as it is."""
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ± {fmt.replace('+', '').format(statistics.stdev(vals))}"


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [header] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    print(f"\n## {title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps (default: cpu)")
    p.add_argument(
        "--repeat", type=int, default=7, help="timed runs per measurement; the median is reported (default: 7)"
    )
    p.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    return p


def machine_line(device: str) -> str:
    import platform

    if device.startswith("cuda"):
        return f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}"
    if device == "mps":
        return f"device: mps ({platform.platform()}) | torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"device: {cpu}, {torch.get_num_threads()} threads | torch {torch.__version__}"
