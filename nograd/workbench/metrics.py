"""metrics.jsonl and metrics.csv: one row per evaluation, rewritten whole after each.

A row holds step, wall_s (training time), forward_tokens (cumulative), train_loss (mean since
the previous row), every metric of the task (val_loss, accuracy, ...), lr, and whatever the
method reports. The CSV's columns are the union of the rows' keys, in order of appearance.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def read_rows(path: Path, max_step: int) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl up to ``max_step`` (later rows belong to a lost future)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row["step"] <= max_step:
                rows.append(row)
    return rows


def write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` to ``out/metrics.jsonl`` and ``out/metrics.csv``."""
    with open(out / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
