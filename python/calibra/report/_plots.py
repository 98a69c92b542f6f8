"""The report's figures: matplotlib figures serialized as inline SVG text.

matplotlib is optional (``pip install "calibra[report]"``): without it :func:`available` is False and the
page shows the same numbers as tables. Nothing here touches pyplot or the process-wide backend: each
figure is a bare ``matplotlib.figure.Figure`` saved through its own SVG canvas, so rendering a report
inside a user's notebook or GUI program changes none of their matplotlib state.

Every function takes plain numbers and returns the SVG markup (``<svg ...>...</svg>``) or raises; the
caller (``_sections``) turns a failure into a table with a note, so a plotting bug never costs a job.
"""

from __future__ import annotations

import io
import math
import re

# points beyond which a scatter is embedded as a raster image inside the SVG: a 70B model has ~560 Linear
# modules per expert-free model and tens of thousands with experts; vector markers would bloat the page
_RASTER_POINTS = 4000
_WORST = "#c0392b"  # the colour of everything the reader should look at first
_LADDER = "#e67e22"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot(1, 1, 1)


def _svg(fig, salt: str) -> str:
    """The figure as inline SVG. Text stays text (no embedded glyph outlines: smaller, selectable, and it
    needs no font file: the browser's sans-serif renders it). The hash salt makes the element ids
    deterministic and distinct per figure: several SVGs share one HTML document, and two figures with
    equal ids would clip each other's paths."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt, "font.size": 9}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    start = text.find("<svg")
    svg = text[start:]
    # shrink with a narrow window, never grow past the drawn size (the viewBox keeps the aspect ratio)
    return re.sub(
        r'<svg([^>]*?) width="([\d.]+)pt" height="([\d.]+)pt"',
        r'<svg\1 class="plot" style="max-width: \2pt"',
        svg,
        count=1,
    )


def time_by_stage(stages: dict[str, float]) -> str:
    fig, ax = _figure(6.4, 0.4 + 0.3 * len(stages))
    names = list(stages)
    ax.barh(names, [stages[n] for n in names], color="#4a7ab5")
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    for i, n in enumerate(names):
        ax.annotate(f" {stages[n]:.2f} s", (stages[n], i), va="center", fontsize=8)
    ax.margins(x=0.15)
    return _svg(fig, "time")


def module_loss(points: list[dict], worst: list[str], ylabel: str) -> str:
    """One marker per module at (layer, relative loss), one colour per role; the ``worst`` names are
    labelled, the damping ladder's interventions ringed."""
    fig, ax = _figure(9.0, 3.8)
    roles = sorted({p["role"] for p in points})
    raster = len(points) > _RASTER_POINTS
    cmap = _colours(len(roles))
    for k, role in enumerate(roles):
        sel = [p for p in points if p["role"] == role]
        ax.scatter(
            [p["x"] for p in sel], [p["y"] for p in sel], s=14, color=cmap[k], label=role, rasterized=raster, zorder=2
        )
    ladder = [p for p in points if p["ladder"]]
    if ladder:
        ax.scatter(
            [p["x"] for p in ladder],
            [p["y"] for p in ladder],
            s=90,
            facecolors="none",
            edgecolors=_LADDER,
            linewidths=1.5,
            label="damping raised (ladder)",
            zorder=3,
        )
    for p in points:
        if p["name"] in worst:
            ax.annotate(
                p["name"],
                (p["x"], p["y"]),
                xytext=(6, 4 - 10 * worst.index(p["name"]) % 30),  # staggered: neighbours must not overprint
                textcoords="offset points",
                fontsize=7,
                color=_WORST,
            )
            ax.scatter([p["x"]], [p["y"]], s=40, marker="x", color=_WORST, zorder=4)
    if all(p["y"] > 0 for p in points):
        ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    _integer_ticks(ax)
    return _svg(fig, "loss")


def bars_by_layer(values: list[float], labels: list[str], ylabel: str, highlight: int | None, salt: str) -> str:
    fig, ax = _figure(7.2, 2.8)
    colours = ["#4a7ab5"] * len(values)
    if highlight is not None:
        colours[highlight] = _WORST
    ax.bar(range(len(values)), values, color=colours)
    ax.set_xticks(range(len(values)), labels, rotation=90 if len(values) > 12 else 0, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    return _svg(fig, salt)


def sparsity(points: list[dict], target: float | None) -> str:
    fig, ax = _figure(7.2, 3.0)
    roles = sorted({p["role"] for p in points})
    cmap = _colours(len(roles))
    raster = len(points) > _RASTER_POINTS
    for k, role in enumerate(roles):
        sel = [p for p in points if p["role"] == role]
        ax.scatter([p["x"] for p in sel], [p["y"] for p in sel], s=14, color=cmap[k], label=role, rasterized=raster)
    if target is not None:
        ax.axhline(target, color=_WORST, linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("achieved sparsity")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    _integer_ticks(ax)
    return _svg(fig, "sparsity")


def expert_heatmap(grid: list[list[float | None]], layers: list[str], marks: list[list[str]]) -> str:
    """Tokens per expert (columns) per MoE layer (rows) on a log colour scale; ``marks[r][c]``: "" or a
    short label drawn in the cell ("0" uncovered, "s" shrunk)."""
    import numpy as np
    from matplotlib.colors import LogNorm

    data = np.array([[np.nan if v is None else max(v, 0.5) for v in row] for row in grid], dtype=float)
    n_rows, n_cols = data.shape
    fig, ax = _figure(min(12.0, 2.0 + 0.28 * n_cols), min(14.0, 1.2 + 0.3 * n_rows))
    finite = data[np.isfinite(data)]
    hi = float(finite.max()) if finite.size else 1.0
    im = ax.imshow(data, aspect="auto", cmap="viridis", norm=LogNorm(vmin=0.5, vmax=max(hi, 1.0)), interpolation="none")
    fig.colorbar(im, ax=ax, label="tokens routed")
    for r in range(n_rows):
        for c in range(n_cols):
            if marks[r][c]:
                ax.text(c, r, marks[r][c], ha="center", va="center", color=_WORST, fontsize=8, fontweight="bold")
    ax.set_yticks(range(n_rows), layers, fontsize=7)
    step = max(1, math.ceil(n_cols / 32))
    ax.set_xticks(range(0, n_cols, step))
    ax.set_xlabel("expert")
    return _svg(fig, "moe")


def rank_curves(
    curves: dict[str, list[tuple[float, float]]], chosen: dict[str, float], xlabel: str, ylabel: str
) -> str:
    """One line per layer (x: rank, y: quality); ``chosen`` rank per curve marked."""
    fig, ax = _figure(7.2, 3.4)
    cmap = _colours(len(curves))
    ys = []
    for k, (name, pts) in enumerate(curves.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", color=cmap[k], label=name, linewidth=1)
        ys += [p[1] for p in pts]
        if name in chosen:
            y = dict(pts).get(chosen[name])
            if y is not None:
                ax.scatter([chosen[name]], [y], s=70, facecolors="none", edgecolors=_WORST, linewidths=1.5, zorder=3)
    if ys and min(ys) < 0 < max(ys) or (ys and max(ys) / max(min(abs(y) for y in ys), 1e-12) > 1e3):
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, ncol=1 + len(curves) // 16)
    return _svg(fig, "kvcurves")


def grouped_bars(groups: dict[str, list[float]], labels: list[str], ylabel: str, salt: str) -> str:
    """Bars per label, one colour per group (e.g. K and V ranks per layer)."""
    fig, ax = _figure(7.2, 2.6)
    n = max(1, len(groups))
    width = 0.8 / n
    cmap = _colours(n)
    for k, (name, vals) in enumerate(groups.items()):
        ax.bar([i + (k - (n - 1) / 2) * width for i in range(len(vals))], vals, width=width, color=cmap[k], label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 12 else 0, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    return _svg(fig, salt)


def memory(
    planned: dict[str, float], phases: dict[str, float], measured: dict[str, float], series: list[float] | None
) -> str:
    """Host bytes by phase, planned and measured (paired bars), against the job's overall measured peaks
    (dashed lines); with ``series`` (RSS after each streamed layer) a second panel."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 2.8 if not series else 4.8), dpi=100, layout="constrained")
    axes = fig.subplots(2 if series else 1, 1, squeeze=False)[:, 0]
    ax = axes[0]
    mib = 2.0**20
    names = list(planned) + [p for p in phases if p not in planned]
    ys = list(range(len(names)))
    ax.barh(
        [y - 0.2 for y in ys], [planned.get(n, 0) / mib for n in names], height=0.4, color="#9db4d6", label="planned"
    )
    if phases:
        ax.barh(
            [y + 0.2 for y in ys],
            [phases.get(n, 0) / mib for n in names],
            height=0.4,
            color="#2c7a3f",
            label="measured (phase peak)",
        )
    ax.set_yticks(ys, names)
    ax.invert_yaxis()
    cmap = [_WORST, "#7d3c98", "#555555"]
    for k, (label, v) in enumerate(measured.items()):
        ax.axvline(v / mib, color=cmap[k % 3], linestyle="--", linewidth=1.5, label=f"measured: {label}")
    ax.set_xlabel("MiB")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    if series:
        ax2 = axes[1]
        ax2.plot(range(len(series)), [v / mib for v in series], marker=".", color="#4a7ab5")
        ax2.set_xlabel("streamed layer")
        ax2.set_ylabel("RSS after layer (MiB)")
        ax2.grid(True, alpha=0.3)
        _integer_ticks(ax2)
    return _svg(fig, "memory")


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _colours(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]
