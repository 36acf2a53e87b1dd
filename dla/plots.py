"""PNG figures for the command line (matplotlib is optional: without it no PNG, and a note says why)."""

from __future__ import annotations

import sys
from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or ``None`` (with a note) if not installed."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed, so no PNG is written (pip install matplotlib)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def line_plot(series: dict[str, tuple[list, list]], path: Path, title: str, xlabel: str, ylabel: str,
              logx: bool = False) -> Path | None:
    """One line per ``label -> (xs, ys)``; ``None`` values in ``ys`` are left out."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) <= 32 else None, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return save(fig, path)


def heatmap(values: list[list[float]], row_labels: list, col_labels: list, path: Path, title: str, xlabel: str,
            ylabel: str) -> Path | None:
    """``values[i][j]`` in [0, 1] as a colour grid with the numbers written in."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(col_labels), 1.2 + 0.6 * len(row_labels)))
    image = draw_heatmap(ax, values, row_labels, col_labels, title, xlabel, ylabel)
    fig.colorbar(image, ax=ax, label="accuracy")
    return save(fig, path)


def draw_heatmap(ax, values: list[list[float]], row_labels: list, col_labels: list, title: str, xlabel: str,
                 ylabel: str, fontsize: float = 8):
    """One accuracy grid on ``ax`` (red 0 to green 1, each cell's percentage written in); returns
    the image, for a colour bar."""
    image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], fontsize=fontsize)
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels], fontsize=fontsize)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=fontsize)
    ax.set_title(title, fontsize=fontsize + 1)
    ax.set_xlabel(xlabel, fontsize=fontsize)
    ax.set_ylabel(ylabel, fontsize=fontsize)
    return image


def save(fig, path: Path, tight: bool = True) -> Path:
    """Write ``fig`` as a PNG and close it; ``tight=False`` for figures whose colour bar spans
    several panels (tight_layout cannot place it)."""
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches=None if tight else "tight")
    plt.close(fig)
    return path
