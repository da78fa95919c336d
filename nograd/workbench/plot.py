"""A run's curves as a PNG (matplotlib is optional: ``pip install nograd[plot]``)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from nograd.tasks.base import Metric


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _series(rows: Sequence[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in rows if r.get(y) is not None and math.isfinite(r[y])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _panels(metrics: Sequence[Metric]) -> list[tuple[str, list[str], dict[str, float]]]:
    """(y label, row keys, reference levels) per panel row: the losses together, then each other metric."""
    losses = [m for m in metrics if m.name.endswith("_loss")]
    refs: dict[str, float] = {}
    for m in losses:
        refs.update(m.references)
    label = losses[0].label if losses and losses[0].label else "loss"
    panels = [(label, ["train_loss"] + [m.name for m in losses], refs)]
    for m in metrics:
        if m not in losses:
            panels.append((m.label or m.name.replace("_", " "), [m.name], dict(m.references)))
    return panels


def plot_metrics(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    metrics: Sequence[Metric] = (Metric("val_loss", "min"),),
    title: str = "",
) -> bool:
    """Plot train loss and each of the task's metrics against step and against forward tokens.

    Losses share one row of panels; every other metric gets its own. Each metric's reference
    levels are drawn as labelled dotted lines. Returns False (and writes nothing) when
    matplotlib is not installed.
    """
    if not have_matplotlib():
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    panels = _panels(metrics)
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4 * len(panels)), squeeze=False)
    for (ylabel, keys, refs), ax_row in zip(panels, axes):
        for ax, x, xlabel in ((ax_row[0], "step", "step"), (ax_row[1], "forward_tokens", "forward tokens")):
            for key in keys:
                xs, ys = _series(rows, x, key)
                if xs:
                    style = "-" if key == "train_loss" else "o-"
                    ax.plot(xs, ys, style, label=key.replace("_", " "), markersize=3)
            for i, (name, level) in enumerate(sorted(refs.items(), key=lambda kv: -kv[1])):
                ax.axhline(level, color="0.5", linestyle=":", linewidth=1)
                ax.annotate(
                    f"{name} {level:.2f}",
                    (1.0, level),
                    xycoords=("axes fraction", "data"),
                    xytext=(-4, 2 if i % 2 == 0 else -9),
                    textcoords="offset points",
                    ha="right",
                    fontsize=7,
                    color="0.35",
                )
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
