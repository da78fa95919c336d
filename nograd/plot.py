"""Loss curves as a PNG (matplotlib is optional: ``pip install nograd[plot]``)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _series(rows: Sequence[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    pts = [(r[x], r[y]) for r in rows if r.get(y) is not None and math.isfinite(r[y])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_metrics(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> bool:
    """Plot train and val loss against step and against forward tokens.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    if not have_matplotlib():
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x, label in ((axes[0], "step", "step"), (axes[1], "forward_tokens", "forward tokens")):
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            xs, ys = _series(rows, x, key)
            if xs:
                ax.plot(xs, ys, style, label=key.replace("_", " "), markersize=3)
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/char)")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
