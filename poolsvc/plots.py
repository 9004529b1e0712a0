"""Plots of the study (``poolsvc bench``): latency with its p99 band, failure heatmaps.

``latency.png``: one panel per buffer size; x is the fragmentation level by
name and index; each strategy's p50 is a line and its p99 a shaded band
above it; a cell whose every attempt was refused gets an explicit ``x``
marker on the panel's floor (a strategy never simply vanishes).  All panels
share one logarithmic latency axis, so a panel's scale never exaggerates a
small difference.

``failure.png``: one heatmap per strategy, size (rows) by fragmentation
(columns), each cell annotated with its failure percentage.

matplotlib is optional (``pip install 'poolsvc[plot]'``); callers check for
it.  Figures are written with the Agg backend, never shown.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .study import Report

COLOURS = {"contiguous": "tab:blue", "static": "tab:orange", "scattered": "tab:green"}
MARKERS = {"contiguous": "o", "static": "s", "scattered": "D"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _page_note(report: Report) -> str:
    """A second title line, ``kernel pages of 16 KiB``, when the study modelled pages above 4 KiB."""
    from .study import human_size

    return f"\nkernel pages of {human_size(report.page_size)}" if report.page_size > 4096 else ""


def latency(report: Report, path: str) -> str:
    """p50 lines with p99 bands per strategy, one panel per size; returns ``path``."""
    import matplotlib.ticker

    from .study import STRATEGIES, human_size

    plt = _pyplot()
    levels = report.levels
    ticks = [f"{lv.level}\nindex {lv.index:.2f}" for lv in levels]
    xpos = {lv.level: i for i, lv in enumerate(levels)}
    sizes = sorted({r.size for r in report.results})
    values = [v for r in report.results for v in (r.p50_us, r.p99_us) if v is not None]
    low = min(values, default=1.0) / 3
    high = max(values, default=10.0) * 1.5
    cols = min(4, len(sizes))
    rows = -(-len(sizes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.8 * rows), squeeze=False, sharey=True)
    for ax, size in zip(axes.flat, sizes):
        for strategy in STRATEGIES:
            cells = sorted((xpos[r.level], r) for r in report.results
                           if r.size == size and r.strategy == strategy and r.level in xpos)
            ok = [(x, r) for x, r in cells if r.p50_us is not None]
            if ok:
                xs = [x for x, _ in ok]
                ax.plot(xs, [r.p50_us for _, r in ok], color=COLOURS[strategy], marker=MARKERS[strategy],
                        markersize=5, label=f"{strategy} p50")
                ax.fill_between(xs, [r.p50_us for _, r in ok], [r.p99_us for _, r in ok],
                                color=COLOURS[strategy], alpha=0.18, linewidth=0)
            # refusals sit on the panel's floor, each strategy a little apart so none hides another
            shift = (STRATEGIES.index(strategy) - 1) * 0.12
            refused = [x + shift for x, r in cells if r.p50_us is None]
            if refused:
                ax.plot(refused, [low * 1.4] * len(refused), linestyle="none", marker="x", markersize=9,
                        markeredgewidth=2, color=COLOURS[strategy], label=f"{strategy}: all refused")
        ax.set_title(f"buffer {human_size(size)}", fontsize=10)
        ax.set_xticks(range(len(levels)), ticks, fontsize=7)
        ax.set_xlim(-0.4, len(levels) - 0.6)
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(alpha=0.3, which="both")
    for ax in axes[:, 0]:
        ax.set_ylabel("latency, µs (log)\nline p50, band up to p99", fontsize=8)
    for ax in list(axes.flat)[len(sizes):]:
        ax.axis("off")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.suptitle("Allocation latency by fragmentation level (index = unusable free space index, "
                 f"order {report.params.get('index_order', 4)}): p50 line, p99 band, x = every attempt refused"
                 f"{_page_note(report)}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def failure_heatmaps(report: Report, path: str) -> str:
    """One failure-rate heatmap per strategy (size x fragmentation); returns ``path``."""
    import numpy as np

    from .study import STRATEGIES, human_size

    plt = _pyplot()
    levels = report.levels
    sizes = sorted({r.size for r in report.results})
    fig, axes = plt.subplots(1, len(STRATEGIES), figsize=(4.2 * len(STRATEGIES), 0.42 * len(sizes) + 2.4),
                             squeeze=False, sharey=True)
    image = None
    for ax, strategy in zip(axes[0], STRATEGIES):
        grid = np.full((len(sizes), len(levels)), np.nan)
        for i, size in enumerate(sizes):
            for j, lv in enumerate(levels):
                cell = report.cell(lv.level, size, strategy)
                if cell is not None:
                    grid[i, j] = cell.failure_rate
        image = ax.imshow(grid, cmap="Reds", vmin=0.0, vmax=1.0, aspect="auto", origin="lower")
        for i in range(len(sizes)):
            for j in range(len(levels)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=7,
                            color="white" if grid[i, j] > 0.6 else "black")
        ax.set_title(strategy, fontsize=10)
        ax.set_xticks(range(len(levels)), [f"{lv.level}\n{lv.index:.2f}" for lv in levels], fontsize=7)
        ax.set_yticks(range(len(sizes)), [human_size(s) for s in sizes], fontsize=8)
        ax.set_xlabel("fragmentation level, index", fontsize=8)
    axes[0][0].set_ylabel("buffer size", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), fraction=0.025, label="fraction of attempts refused")
    fig.suptitle("Failure rate by buffer size and fragmentation (unusable free space index, order "
                 f"{report.params.get('index_order', 4)}){_page_note(report)}", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot(report: Report, directory: str) -> list[str]:
    """Write ``latency.png`` and ``failure.png`` into ``directory``; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    return [latency(report, os.path.join(directory, "latency.png")),
            failure_heatmaps(report, os.path.join(directory, "failure.png"))]
