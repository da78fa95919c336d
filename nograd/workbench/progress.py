"""The one-line progress bar of ``nograd train``.

Hand-written rather than ``tqdm``: torch is nograd's only hard dependency, and all the bar needs
is one carriage-return line on a terminal (nothing when the output is a pipe or a file, where
the evaluation lines are the log). For population methods the rate is member-tokens/s (every
member's rows count: the figure that says how well a population is batched); for the others it
is the batch's tokens/s.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


def format_duration(s: float) -> str:
    """``65`` -> ``1:05``, ``3725`` -> ``1:02:05``; ``?`` when not finite."""
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """step/total, loss, a token rate and the time left, redrawn at most 4 times a second."""

    def __init__(
        self, total: int, enabled: bool, stream: TextIO = sys.stderr, rate_label: str = "tok/s"
    ) -> None:
        self.total = total
        self.stream = stream
        self.rate_label = rate_label
        self.enabled = enabled and stream.isatty()
        self.last = 0.0
        self.shown = False

    def update(self, step: int, loss: float, tokens_per_s: float, eta_s: float) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < 0.25 and step < self.total):
            return
        self.last = now
        width = 24
        filled = int(width * step / max(1, self.total))
        bar = "#" * filled + "-" * (width - filled)
        line = (
            f"[{bar}] {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} {self.rate_label} "
            f"eta {format_duration(eta_s)}"
        )
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
