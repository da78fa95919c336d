"""``nograd budget-law``: how many evaluations black-box training needs, as a fitted law.

Reads the cells of a ``nograd compare`` results folder in which forward-only runs cover models
of several sizes ``d`` (trainable parameters) and populations ``N``, and gradient runs the same
models. For each target level of the task's metric it takes the first evaluation at or past it
(:func:`~nograd.workbench.compare.reach`) and writes

* the table: per (d, N) the generations and forward-token-equivalents (FTE) to each target, the
  gradient run's steps and FTE on the same model, and the compute ratio (black-box FTE /
  gradient FTE);
* the fit, per target reached by at least three cells (least squares in log space)::

      generations = C * d^a * N^b,    so   FTE = C * tokens_per_member * d^a * N^(b + 1);

* ``budget-law.md``, ``budget-law.json`` and ``budget-law.png`` (FTE to each target, and the
  compute ratio, against the target) in the folder.

Example (the spec of BENCHMARKS.md):
    nograd compare benchmarks/shakespeare-budget-law.toml
    nograd budget-law runs/compare-budget-law
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nograd.core.errors import UsageError
from nograd.workbench.checkpoint import load_checkpoint
from nograd.workbench.compare import reach
from nograd.workbench.metrics import read_rows
from nograd.workbench.registry import get_method


@dataclass
class Cell:
    """One run of the folder: its method, model size, population and what it took to each target."""

    name: str
    optimizer: str
    forward_only: bool
    parameters: int
    population: int | None
    tokens_per_step: float  # FTE of one generation or step
    hits: dict[float, dict[str, float] | None] = field(default_factory=dict)


def _parameters(folder: Path, summary: dict) -> int:
    if summary.get("parameters"):
        return int(summary["parameters"])
    # runs from before the field existed: the checkpoint's tensors, tied ones (one storage) once
    state = load_checkpoint(folder / "checkpoint.pt")["model"]
    tensors = {t.data_ptr(): t.numel() for t in state.values() if isinstance(t, torch.Tensor)}
    return sum(tensors.values())


def read_cells(root: Path, targets: list[float]) -> list[Cell]:
    """Every finished run under ``root`` (its ``summary.json``), with its hits at ``targets``."""
    cells = []
    for summary_path in sorted(root.glob("**/summary.json")):
        folder = summary_path.parent
        try:
            summary = json.loads(summary_path.read_text())
            config = json.loads((folder / "config.json").read_text())
            rows = read_rows(folder / "metrics.jsonl", int(summary["steps"]))
        except (OSError, ValueError) as e:
            raise UsageError(f"{folder}: not a finished run ({e})") from None
        metric = summary["metric"]
        goal = next(m["goal"] for m in summary["metrics"] if m["name"] == metric)
        info = get_method(summary["optimizer"])
        steps = max(int(summary["steps"]), 1)
        cell = Cell(
            name=str(folder.relative_to(root)),
            optimizer=summary["optimizer"],
            forward_only=info.forward_only,
            parameters=_parameters(folder, summary),
            population=config.get("population") if info.forward_only else None,
            tokens_per_step=float(summary["forward_tokens"]) / steps,
        )
        cell.hits = {t: reach(rows, metric, goal, t) for t in targets}
        cells.append(cell)
    if not cells:
        raise UsageError(f"no finished runs (summary.json) under {str(root)!r}")
    return cells


def fit(points: list[tuple[float, float, float]]) -> dict[str, float] | None:
    """Least squares ``log g = log C + a log d + b log N`` over (d, N, g); None with < 3 points or
    when d or N does not vary (the exponent would be undetermined)."""
    if len(points) < 3 or len({p[0] for p in points}) < 2 or len({p[1] for p in points}) < 2:
        return None
    x = torch.tensor([[1.0, math.log(d), math.log(n)] for d, n, _ in points], dtype=torch.float64)
    y = torch.tensor([math.log(g) for _, _, g in points], dtype=torch.float64)
    coef = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    resid = y - x @ coef
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return {
        "C": math.exp(float(coef[0])),
        "a": float(coef[1]),
        "b": float(coef[2]),
        "r2": r2,
        "points": len(points),
    }


def analyse(cells: list[Cell], targets: list[float]) -> dict[str, Any]:
    """The table rows, the gradient baseline per model size, and the fit per target."""
    gradient = {}
    for c in cells:
        if not c.forward_only:
            gradient.setdefault(c.parameters, c)
    rows = []
    fits = {}
    for t in targets:
        points = []
        for c in cells:
            if not c.forward_only or c.hits[t] is None or not c.population:
                continue
            if c.hits[t]["steps"] > 0:
                points.append((float(c.parameters), float(c.population), float(c.hits[t]["steps"])))
        fits[t] = fit(points)
    for c in sorted((c for c in cells if c.forward_only), key=lambda c: (c.parameters, c.population or 0)):
        base = gradient.get(c.parameters)
        row: dict[str, Any] = {"cell": c.name, "d": c.parameters, "N": c.population, "targets": {}}
        for t in targets:
            hit, ref = c.hits[t], (base.hits[t] if base else None)
            row["targets"][t] = {
                "generations": None if hit is None else hit["steps"],
                "tokens": None if hit is None else hit["tokens"],
                "gradient_steps": None if ref is None else ref["steps"],
                "gradient_tokens": None if ref is None else ref["tokens"],
                "ratio": hit["tokens"] / ref["tokens"] if hit and ref and ref["tokens"] else None,
            }
        rows.append(row)
    grad_rows = [
        {
            "cell": c.name,
            "d": c.parameters,
            "optimizer": c.optimizer,
            "steps": {t: (c.hits[t] or {}).get("steps") for t in targets},
        }
        for c in gradient.values()
    ]
    return {"targets": targets, "rows": rows, "gradient": grad_rows, "fits": fits}


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def markdown(result: dict[str, Any]) -> str:
    targets = result["targets"]
    head = "| d | N | " + " | ".join(f"to {t:g}: gens / FTE / ratio" for t in targets) + " |"
    lines = [
        "Generations and forward-token-equivalents (FTE) to each target; ratio = black-box FTE / "
        "gradient FTE on the same model (- : not reached).",
        "",
        head,
        "|" + "---|" * (2 + len(targets)),
    ]
    for row in result["rows"]:
        cells = []
        for t in targets:
            v = row["targets"][t]
            cells.append(
                f"{_num(v['generations'], 'd')} / {_num(v['tokens'], '.2g')} / {_num(v['ratio'], '.0f')}"
            )
        lines.append(f"| {row['d']:,} | {row['N']} | " + " | ".join(cells) + " |")
    lines += ["", "| gradient run | d | " + " | ".join(f"steps to {t:g}" for t in targets) + " |"]
    lines.append("|" + "---|" * (2 + len(targets)))
    for g in result["gradient"]:
        lines.append(
            f"| {g['optimizer']} | {g['d']:,} | "
            + " | ".join(_num(g["steps"][t], "d") for t in targets)
            + " |"
        )
    lines += ["", "Fit per target: generations = C d^a N^b (least squares in log space).", ""]
    lines += ["| target | C | a (model size) | b (population) | R^2 | cells |", "|---|---|---|---|---|---|"]
    for t in targets:
        f = result["fits"][t]
        if f is None:
            lines.append(f"| {t:g} | - | - | - | - | fewer than 3, or d or N fixed |")
        else:
            lines.append(
                f"| {t:g} | {f['C']:.3g} | {f['a']:.2f} | {f['b']:.2f} | {f['r2']:.2f} | {f['points']} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """FTE to each target and the compute ratio, against the target; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    targets = result["targets"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in result["rows"]:
        pts = [(t, row["targets"][t]) for t in targets if row["targets"][t]["tokens"]]
        label = f"d={row['d']:,}, N={row['N']}"
        left.plot([t for t, _ in pts], [v["tokens"] for _, v in pts], "o-", label=label)
        ratio = [(t, v["ratio"]) for t, v in pts if v["ratio"]]
        right.plot([t for t, _ in ratio], [r for _, r in ratio], "o-", label=label)
    for k, g in enumerate(result["gradient"]):
        per_step = next((c for c in result["rows"] if c["d"] == g["d"]), None)
        pts = [(t, per_step["targets"][t]["gradient_tokens"]) for t in targets] if per_step else []
        pts = [(t, v) for t, v in pts if v]
        style = ("--", ":", "-.")[k % 3]  # one line style per gradient run
        label = f"{g['optimizer']} d={g['d']:,}"
        left.plot([t for t, _ in pts], [v for _, v in pts], color="k", ls=style, lw=1, label=label)
    for ax, ylabel in (
        (left, "forward-token-equivalents to target"),
        (right, "compute ratio (black-box / gradient)"),
    ):
        ax.set_xlabel("target val loss")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def targets_of(folder: str | Path) -> list[float]:
    """The targets of a compare folder's ``results.csv`` (its ``steps_to_X`` columns)."""
    if not Path(folder).is_dir():
        raise UsageError(f"{str(folder)!r} is not a folder of runs")
    path = Path(folder) / "results.csv"
    try:
        header = path.read_text().splitlines()[0].split(",")
    except (OSError, IndexError):
        raise UsageError(f"{str(path)!r} cannot be read; give --targets") from None
    targets = [float(h[len("steps_to_") :]) for h in header if h.startswith("steps_to_")]
    if not targets:
        raise UsageError(f"{str(path)!r} names no targets; give --targets")
    return targets


def run_budget_law(folder: str | Path, targets: list[float]) -> dict[str, Any]:
    """Analyse ``folder`` and write budget-law.md/.json/.png into it; returns the result."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{str(root)!r} is not a folder of runs")
    if not targets or any(not math.isfinite(t) for t in targets):
        raise UsageError("give one or more finite --targets")
    result = analyse(read_cells(root, targets), targets)
    (root / "budget-law.md").write_text(markdown(result))
    serialisable = {**result, "fits": {str(t): f for t, f in result["fits"].items()}}
    serialisable["rows"] = [
        {**r, "targets": {str(t): v for t, v in r["targets"].items()}} for r in result["rows"]
    ]
    serialisable["gradient"] = [
        {**g, "steps": {str(t): v for t, v in g["steps"].items()}} for g in result["gradient"]
    ]
    (root / "budget-law.json").write_text(json.dumps(serialisable, indent=2) + "\n")
    if not plot(result, root / "budget-law.png"):
        print("nograd: warning: matplotlib is not installed, so no budget-law.png", file=sys.stderr)
    return result
