"""``nograd compare``: every method on every task at the same budget, one table and two figures per task.

A spec names tasks, methods and seeds; each (task, method, seed) is a *cell*, one ``nograd
train`` run in its own process and folder. A TOML spec::

    out = "runs/compare-baby"            # results folder
    seeds = [0]
    jobs = 2                             # cells run at once, each pinned to its own cores
    threads = 1                          # torch threads per cell
    budget = { steps = 2000 }            # the default budget: steps, minutes or tokens
    targets = [2.5, 2.2, 2.0]            # levels of the task's first metric to time

    [tasks.baby]                         # a name, the task, and its flags as `nograd train` takes them
    task = "shakespeare-char"
    n_layer = 4

    [methods.adamw]                      # a name, the optimizer, and its flags
    optimizer = "adamw"
    lr = 1e-3

    [methods.mezo-equal-fte]
    optimizer = "mezo"
    budget = { like = "adamw", by = "tokens" }   # what adamw's cell of the same task and seed spent

Every method runs on every task; a method's table may also set task flags (a model size of its
own) and ``threads``, as long as the task's table does not set the same flag.

A budget is ``steps = N``, ``minutes = X`` (training wall time), ``tokens = X``
(forward-token-equivalents: a token through a forward is 1, a backward 2), or ``like = METHOD``
with ``by = "tokens"`` or ``"wall"``: the forward-token-equivalents or the training seconds of
that method's cell, so forward-only methods meet a gradient method at equal compute or equal
time. A method table may hold ``opt = { key = "value" }`` for ``--opt`` pairs.

Every cell's config is checked before any runs. A cell that finished (its ``summary.json``
written for the same flags) is not run again; one that stopped part-way resumes from its
checkpoint; one whose flags changed is an error, so no result is silently overwritten. The
results folder gets ``results.csv`` (one row per cell), ``results.md`` (per task: final and
best metric, and the steps, wall time and forward-token-equivalents to reach each target, as
mean ± standard deviation over seeds) and, per task, the first metric against
forward-token-equivalents (``TASK-tokens.png``) and against wall time (``TASK-wall.png``),
every method on one figure.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nograd.core.errors import UsageError
from nograd.core.options import flag_name
from nograd.workbench.config import make_config, resolve
from nograd.workbench.metrics import read_rows

BUDGET_KINDS = ("steps", "minutes", "tokens")
LIKE_BY = ("tokens", "wall")
UNBOUNDED_STEPS = 10**12  # with a minutes or tokens budget the step count does not stop the run
TOP_KEYS = {"out", "seeds", "jobs", "threads", "budget", "targets", "tasks", "methods"}


@dataclass(frozen=True)
class Budget:
    """How long a cell runs: ``kind`` in steps/minutes/tokens with ``value``, or like another method."""

    kind: str
    value: float | None = None
    like: str | None = None
    by: str | None = None

    @classmethod
    def parse(cls, raw: Any, where: str) -> Budget:
        if not isinstance(raw, Mapping) or not raw:
            raise UsageError(f"{where}: budget must be a table such as {{ steps = 2000 }}")
        if "like" in raw:
            by = raw.get("by", "tokens")
            if set(raw) - {"like", "by"} or by not in LIKE_BY or not isinstance(raw["like"], str):
                raise UsageError(f"{where}: budget {{ like = METHOD, by = {' | '.join(LIKE_BY)} }} expected")
            return cls("like", like=raw["like"], by=by)
        if len(raw) != 1 or next(iter(raw)) not in BUDGET_KINDS:
            raise UsageError(f"{where}: budget takes one of {', '.join(BUDGET_KINDS)} (or like = METHOD)")
        kind, value = next(iter(raw.items()))
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        # 0 steps: evaluate only (zero-shot); minutes and tokens must be positive
        if not number or value < 0 or (value == 0 and kind != "steps"):
            raise UsageError(f"{where}: budget {kind} must be a positive number, got {value!r}")
        if kind == "steps" and value != int(value):
            raise UsageError(f"{where}: budget steps must be a whole number, got {value!r}")
        return cls(kind, float(value))

    def describe(self) -> str:
        if self.kind == "like":
            return f"{self.like}'s {'forward-token-equivalents' if self.by == 'tokens' else 'wall time'}"
        return {"steps": "{:g} steps", "minutes": "{:g} min", "tokens": "{:.3g} FTE"}[self.kind].format(
            self.value
        )


@dataclass
class Spec:
    """A parsed comparison: tasks and methods (name -> flags), seeds, budgets, targets."""

    out: Path
    tasks: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    budgets: dict[str, Budget]
    seeds: list[int] = field(default_factory=lambda: [0])
    jobs: int = 1
    threads: int = 1
    targets: list[float] = field(default_factory=list)
    task_targets: dict[str, list[float]] = field(default_factory=dict)

    def only(self, names: list[str]) -> None:
        """Keep the methods ``names`` (and the methods their budgets refer to)."""
        unknown = sorted(set(names) - set(self.methods))
        if unknown:
            raise UsageError(f"--only {unknown[0]!r}: not a method of the spec ({', '.join(self.methods)})")
        keep = set(names) | {self.budgets[n].like for n in names if self.budgets[n].kind == "like"}
        self.methods = {k: v for k, v in self.methods.items() if k in keep}
        self.budgets = {k: v for k, v in self.budgets.items() if k in keep}

    def cells(self) -> list[Cell]:
        return [
            Cell(task, method, seed, self)
            for task in self.tasks
            for method in self.methods
            for seed in self.seeds
        ]


def _whole(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def _targets(raw: Any, where: str) -> list[float]:
    if not isinstance(raw, list) or not all(
        isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) for t in raw
    ):
        raise UsageError(f"{where}: targets must be a list of finite numbers")
    return [float(t) for t in raw]


def parse_spec(raw: Mapping[str, Any], out: str | None = None) -> Spec:
    """A :class:`Spec` from a TOML document's table; ``out`` overrides its ``out``."""
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise UsageError(f"unknown spec key {unknown[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
    tasks, methods = raw.get("tasks"), raw.get("methods")
    for name, table in (("tasks", tasks), ("methods", methods)):
        if not isinstance(table, Mapping) or not table:
            raise UsageError(f"the spec needs at least one [{name}.NAME] table")
        for key, value in table.items():
            if not isinstance(value, Mapping):
                raise UsageError(f"[{name}.{key}] must be a table")
    default_budget = Budget.parse(raw.get("budget", {"steps": 2000}), "budget")
    budgets, task_targets = {}, {}
    method_flags: dict[str, dict[str, Any]] = {}
    for name, table in methods.items():
        flags = dict(table)
        if "optimizer" not in flags:
            raise UsageError(f"[methods.{name}] needs optimizer = NAME")
        budgets[name] = (
            Budget.parse(flags.pop("budget"), f"[methods.{name}]") if "budget" in flags else default_budget
        )
        method_flags[name] = flags
    for name, budget in budgets.items():
        if budget.kind == "like":
            ref = budgets.get(budget.like or "")
            if ref is None or ref.kind == "like":
                raise UsageError(
                    f"[methods.{name}] budget like = {budget.like!r}: that must be a method of the spec "
                    "with its own budget"
                )
    task_flags: dict[str, dict[str, Any]] = {}
    for name, table in tasks.items():
        flags = dict(table)
        if "targets" in flags:
            task_targets[name] = _targets(flags.pop("targets"), f"[tasks.{name}]")
        if "task" not in flags:
            raise UsageError(f"[tasks.{name}] needs task = NAME")
        task_flags[name] = flags
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise UsageError("seeds must be a non-empty list of whole numbers")
    spec = Spec(
        out=Path(out or raw.get("out") or "runs/compare"),
        tasks=task_flags,
        methods=method_flags,
        budgets=budgets,
        seeds=[_whole(s, "a seed", 0) for s in seeds],
        jobs=_whole(raw.get("jobs", 1), "jobs", 1),
        threads=_whole(raw.get("threads", 1), "threads", 1),
        targets=_targets(raw.get("targets", []), "targets"),
        task_targets=task_targets,
    )
    if len(set(spec.seeds)) != len(spec.seeds):
        raise UsageError("seeds must not repeat")
    return spec


def load_spec(path: str, out: str | None = None) -> Spec:
    """Read a TOML spec (``tomllib``, or ``tomli`` before Python 3.11)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise UsageError("reading a TOML spec on Python 3.10 needs `pip install tomli`") from None
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"cannot read spec {path!r}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"spec {path!r} is not valid TOML: {e}") from None
    return parse_spec(raw, out)


# ---------------------------------------------------------------- cells


def _flags(values: Mapping[str, Any]) -> list[str]:
    """``nograd train`` flags for a table of values (``opt`` is a table of ``--opt`` pairs)."""
    out: list[str] = []
    for key, value in values.items():
        if key == "opt":
            if not isinstance(value, Mapping):
                raise UsageError("opt must be a table of KEY = VALUE pairs")
            for k, v in value.items():
                out += ["--opt", f"{k}={v}"]
        elif isinstance(value, bool):
            out += [flag_name(key)] if value else []
        elif isinstance(value, list | Mapping):
            raise UsageError(f"{key} = {value!r}: a train flag takes one value")
        else:
            out += [flag_name(key), str(value)]
    return out


@dataclass
class Cell:
    """One (task, method, seed): a ``nograd train`` run in ``out/TASK/METHOD/seed-N``."""

    task: str
    method: str
    seed: int
    spec: Spec

    @property
    def name(self) -> str:
        return f"{self.task}/{self.method}/seed-{self.seed}"

    @property
    def folder(self) -> Path:
        return self.spec.out / self.task / self.method / f"seed-{self.seed}"

    @property
    def budget(self) -> Budget:
        return self.spec.budgets[self.method]

    def values(self) -> dict[str, Any]:
        """The flat train values of this cell, without its budget."""
        task, method = self.spec.tasks[self.task], self.spec.methods[self.method]
        both = sorted(set(task) & set(method) - {"opt"})
        if both:
            raise UsageError(f"{both[0]!r} is set by both [tasks.{self.task}] and [methods.{self.method}]")
        threads = method.get("threads", task.get("threads", self.spec.threads))
        return {**task, **method, "seed": self.seed, "threads": threads}

    def budget_flags(self, results: Mapping[str, dict]) -> list[str]:
        budget = self.budget
        if budget.kind == "like":
            ref = results.get(Cell(self.task, budget.like or "", self.seed, self.spec).name)
            if ref is None:
                raise UsageError(f"{self.name}: its budget needs {budget.like}'s cell, which has no result")
            budget = (
                Budget("tokens", ref["forward_tokens"])
                if budget.by == "tokens"
                else Budget("minutes", ref["wall_s"] / 60)
            )
        if budget.kind == "steps":
            return ["--steps", str(int(budget.value or 0))]
        flag = "--budget-minutes" if budget.kind == "minutes" else "--budget-tokens"
        return ["--steps", str(UNBOUNDED_STEPS), flag, repr(budget.value)]

    def check(self) -> None:
        """The cell's config is valid (the same checks as `nograd train`), before anything runs."""
        values = {k: v for k, v in self.values().items() if k != "opt"}
        opts = {str(k): str(v) for k, v in self.spec.methods[self.method].get("opt", {}).items()}
        try:
            resolve(make_config(**values, opts=opts, out=str(self.folder))).validate()
        except TypeError as e:
            raise UsageError(f"{self.name}: {e}") from None
        except UsageError as e:
            raise UsageError(f"{self.name}: {e}") from None

    def command(self, results: Mapping[str, dict]) -> list[str]:
        return [
            "train",
            *_flags(self.values()),
            *self.budget_flags(results),
            "--out",
            str(self.folder),
            "--quiet",
        ]


def _cpu_slots(jobs: int, threads: int) -> list[set[int] | None]:
    """The cores of each of ``jobs`` slots, ``threads`` each, when there are enough; else no pinning."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return [None] * jobs
    if jobs * threads > len(cores):
        return [None] * jobs
    return [set(cores[i * threads : (i + 1) * threads]) for i in range(jobs)]


_LAUNCH = (
    "import os, sys\n"
    "cores = os.environ.pop('NOGRAD_COMPARE_CORES', '')\n"
    "if cores: os.sched_setaffinity(0, {int(c) for c in cores.split(',')})\n"
    "from nograd.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_cell(cell: Cell, results: Mapping[str, dict], cores: set[int] | None) -> dict:
    """Run (or resume, or skip) one cell in a fresh process; return its summary."""
    folder = cell.folder
    command = cell.command(results)
    marker = folder / "cell.json"
    if marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("command") != command:
            raise UsageError(
                f"{cell.name}: {folder} holds a run with other flags; remove it or choose another out folder"
            )
        summary = folder / "summary.json"
        if summary.exists():
            return json.loads(summary.read_text())
        if (folder / "checkpoint.pt").exists():
            command = [*command, "--resume", str(folder / "checkpoint.pt")]
    folder.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(json.dumps({"cell": cell.name, "command": cell.command(results)}, indent=2) + "\n")
    env = {**os.environ, "NOGRAD_COMPARE_CORES": ",".join(map(str, sorted(cores or ())))}
    with open(folder / "train.log", "a") as log:
        log.write(f"$ nograd {' '.join(command)}\n")
        log.flush()
        done = subprocess.run([sys.executable, "-c", _LAUNCH, *command], stdout=log, stderr=log, env=env)
    if done.returncode != 0 or not (folder / "summary.json").exists():
        tail = (folder / "train.log").read_text().strip().splitlines()[-1:] or ["no output"]
        raise UsageError(
            f"{cell.name} failed (exit {done.returncode}): {tail[0]} (log: {folder / 'train.log'})"
        )
    return json.loads((folder / "summary.json").read_text())


def run_all(spec: Spec, report: Callable[[str], None] = print) -> dict[str, dict]:
    """Check every cell, then run them on ``spec.jobs`` slots: budgets of their own first, then the
    cells whose budget is another method's. Returns ``{cell name: summary}``."""
    cells = spec.cells()
    for cell in cells:
        cell.check()
    results: dict[str, dict] = {}
    lock = threading.Lock()
    # pinned to cores only when every cell takes the spec's thread count (a method may set its own)
    uniform = all(c.values()["threads"] == spec.threads for c in cells)
    slots = _cpu_slots(spec.jobs, spec.threads) if uniform else [None] * spec.jobs
    free = list(range(spec.jobs))
    total = len(cells)

    def work(cell: Cell) -> None:
        with lock:
            slot = free.pop()
        try:
            summary = run_cell(cell, results, slots[slot])
        finally:
            with lock:
                free.append(slot)
        with lock:
            results[cell.name] = summary
            value = summary.get(f"final_{summary['metric']}")
            shown = "-" if value is None else f"{value:.4f}"
            report(
                f"[{len(results)}/{total}] {cell.name}: {summary['metric']} {shown}, "
                f"{summary['steps']} steps, {summary['wall_s']:.1f} s, {summary['forward_tokens']:.3g} FTE"
            )

    for phase in (
        [c for c in cells if c.budget.kind != "like"],
        [c for c in cells if c.budget.kind == "like"],
    ):
        with ThreadPoolExecutor(spec.jobs) as pool:
            for future in [pool.submit(work, c) for c in phase]:
                future.result()
    return results


# ---------------------------------------------------------------- results


def _rows(folder: Path) -> list[dict]:
    return read_rows(folder / "metrics.jsonl", sys.maxsize)


def reach(rows: list[dict], metric: str, goal: str, target: float) -> dict[str, float] | None:
    """Steps, wall seconds and forward-token-equivalents at the first evaluation at or past ``target``."""
    for row in rows:
        value = row.get(metric)
        if (
            value is not None
            and math.isfinite(value)
            and (value <= target if goal == "min" else value >= target)
        ):
            return {"steps": row["step"], "wall_s": row["wall_s"], "tokens": row["forward_tokens"]}
    return None


def collect(spec: Spec, results: Mapping[str, dict]) -> list[dict]:
    """One row per cell: its budget, final and best metric, and what it took to reach each target."""
    out = []
    for cell in spec.cells():
        summary = results[cell.name]
        metric = summary["metric"]
        goal = next(m["goal"] for m in summary["metrics"] if m["name"] == metric)
        rows = _rows(cell.folder)
        row: dict[str, Any] = {
            "task": cell.task,
            "method": cell.method,
            "optimizer": summary["optimizer"],
            "seed": cell.seed,
            "budget": cell.budget.describe(),
            "stopped": summary["stopped"],
            "steps": summary["steps"],
            "wall_s": round(summary["wall_s"], 3),
            "forward_tokens": summary["forward_tokens"],
            "metric": metric,
            "final": summary.get(f"final_{metric}"),
            "best": summary.get(f"best_{metric}"),
        }
        for target in spec.task_targets.get(cell.task, spec.targets):
            hit = reach(rows, metric, goal, target)
            for key in ("steps", "wall_s", "tokens"):
                row[f"{key}_to_{target:g}"] = None if hit is None else hit[key]
        out.append(row)
    return out


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def table(spec: Spec, rows: list[dict]) -> str:
    """The markdown tables, one per task: mean ± std over seeds; targets as wall s / FTE (reached/seeds)."""
    parts = []
    for task in spec.tasks:
        mine = [r for r in rows if r["task"] == task]
        if not mine:
            continue
        metric = mine[0]["metric"]
        targets = spec.task_targets.get(task, spec.targets)
        head = ["method", "budget", "steps", "wall s", "FTE", f"final {metric}", f"best {metric}"]
        head += [f"to {t:g}: wall s / FTE" for t in targets]
        lines = [f"### {task} ({len(spec.seeds)} seed{'s' if len(spec.seeds) > 1 else ''})", ""]
        lines += ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
        for method in spec.methods:
            cells = [r for r in mine if r["method"] == method]
            cols = [f"{method} (`{cells[0]['optimizer']}`)", cells[0]["budget"]]
            cols.append(_spread([float(r["steps"]) for r in cells], ".0f"))
            cols.append(_spread([r["wall_s"] for r in cells], ".1f"))
            cols.append(_spread([r["forward_tokens"] for r in cells], ".3g"))
            for key in ("final", "best"):
                cols.append(_spread([r[key] for r in cells if r[key] is not None], ".3f"))
            for t in targets:
                hit = [r for r in cells if r[f"wall_s_to_{t:g}"] is not None]
                if not hit:
                    cols.append("not reached")
                    continue
                text = f"{_spread([r[f'wall_s_to_{t:g}'] for r in hit], '.1f')} / "
                text += _spread([r[f"tokens_to_{t:g}"] for r in hit], ".3g")
                cols.append(text + (f" ({len(hit)}/{len(cells)})" if len(hit) < len(cells) else ""))
            lines.append("| " + " | ".join(cols) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot(spec: Spec, results: Mapping[str, dict]) -> list[Path]:
    """Per task, the first metric against forward-token-equivalents and against wall time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "nograd: warning: matplotlib is not installed, so no plots (pip install 'nograd[plot]')",
            file=sys.stderr,
        )
        return []
    written = []
    colors = plt.get_cmap("tab10")
    for task in spec.tasks:
        cells = [c for c in spec.cells() if c.task == task]
        summary = results[cells[0].name]
        metric = next(m for m in summary["metrics"] if m["name"] == summary["metric"])
        for axis, key, label in (
            ("tokens", "forward_tokens", "forward-token-equivalents"),
            ("wall", "wall_s", "training wall time (s)"),
        ):
            fig, ax = plt.subplots(figsize=(8, 5))
            logged = False
            for i, method in enumerate(spec.methods):
                for j, cell in enumerate(c for c in cells if c.method == method):
                    rows = [r for r in _rows(cell.folder) if r.get(metric["name"]) is not None]
                    style = {
                        "color": colors(i % 10),
                        "alpha": 0.9 if j == 0 else 0.5,
                        "label": method if j == 0 else None,
                    }
                    if all(r["step"] == 0 for r in rows):  # evaluated only (zero-shot): a level
                        if rows:
                            ax.axhline(rows[-1][metric["name"]], linestyle="--", **style)
                        continue
                    rows = [r for r in rows if r[key] > 0]  # the log axis has no 0
                    logged = True
                    # markers: a cell evaluated once (at its end) is a point, not an empty line
                    xs, ys = [r[key] for r in rows], [r[metric["name"]] for r in rows]
                    ax.plot(xs, ys, marker="o", markersize=3, **style)
            for name, level in metric.get("references", {}).items():
                ax.axhline(level, color="grey", linestyle=":", linewidth=0.8)
                ax.annotate(name, (1, level), xycoords=("axes fraction", "data"), fontsize=7, color="grey")
            if logged:
                ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(metric.get("label") or metric["name"])
            ax.set_title(f"{task}: {metric['name']} ({len(spec.seeds)} seed(s) per method)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            path = spec.out / f"{task}-{axis}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


def compare(spec: Spec, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every cell and write ``results.csv``, ``results.md`` and the plots; return their paths."""
    try:
        spec.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the results folder {str(spec.out)!r}: {e.strerror or e}") from None
    results = run_all(spec, report)
    rows = collect(spec, results)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(spec.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (spec.out / "results.md").write_text(table(spec, rows))
    plots = plot(spec, results)
    return {"csv": spec.out / "results.csv", "table": spec.out / "results.md", "plots": plots, "rows": rows}
