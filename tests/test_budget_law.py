"""`nograd budget-law`: the fit against a known power law, the table against the runs' metrics,
and a tiny compare folder end to end."""

from __future__ import annotations

import json

import pytest
from _foundation import TINY_GPT, small_text

from nograd.cli import main
from nograd.core.errors import UsageError
from nograd.workbench.budget_law import Cell, analyse, fit, run_budget_law
from nograd.workbench.compare import compare, parse_spec


def test_the_fit_recovers_a_known_power_law():
    points = [(d, n, 7.0 * d**0.8 * n**-0.5) for d in (1e3, 4e3, 2e4) for n in (16, 64, 256)]
    f = fit(points)
    assert f["a"] == pytest.approx(0.8, abs=1e-9) and f["b"] == pytest.approx(-0.5, abs=1e-9)
    assert f["C"] == pytest.approx(7.0, rel=1e-9) and f["r2"] == pytest.approx(1.0)
    assert fit(points[:2]) is None  # too few points
    assert fit([(1e3, n, float(n)) for n in (16, 64, 256)]) is None  # d fixed: a is undetermined


def test_the_table_pairs_each_black_box_cell_with_the_gradient_run_on_its_model():
    def cell(name, fo, d, n, steps_to):
        c = Cell(name, "eggroll" if fo else "adamw", fo, d, n, 100.0 * (n or 3))
        c.hits = {
            t: None if s is None else {"steps": s, "wall_s": 1.0, "tokens": s * c.tokens_per_step}
            for t, s in steps_to.items()
        }
        return c

    cells = [
        cell("es-small-64", True, 1000, 64, {3.0: 50, 2.5: None}),
        cell("es-big-64", True, 4000, 64, {3.0: 80, 2.5: 400}),
        cell("adamw-small", False, 1000, None, {3.0: 10, 2.5: 40}),
        cell("adamw-big", False, 4000, None, {3.0: 5, 2.5: 20}),
    ]
    result = analyse(cells, [3.0, 2.5])
    small, big = result["rows"]
    assert small["cell"] == "es-small-64" and small["targets"][2.5]["generations"] is None
    # ratio = (50 generations x 64 members x 100 tokens) / (10 steps x 300 FTE)
    assert small["targets"][3.0]["ratio"] == pytest.approx(50 * 6400 / (10 * 300))
    assert big["targets"][2.5]["gradient_steps"] == 20
    assert result["fits"][3.0] is None  # two cells, one population


def test_a_tiny_compare_folder_end_to_end(tmp_path, capsys):
    task = dict(
        task="shakespeare-char", **TINY_GPT, eval_every=2, sample_chars=0, data=str(small_text(tmp_path))
    )
    task.pop("n_embd")
    es = {"optimizer": "eggroll", "sigma": 0.05, "lr": 3e-2, "warmup": 0}
    methods = {
        "adamw": {"optimizer": "adamw", "lr": 1e-2, "warmup": 0, "n_embd": 8},
        "es-w8-n4": {**es, "population": 4, "n_embd": 8},
        "es-w8-n8": {**es, "population": 8, "n_embd": 8},
        "es-w16-n4": {**es, "population": 4, "n_embd": 16},
    }
    raw = {"out": str(tmp_path / "cmp"), "seeds": [0], "jobs": 2, "budget": {"steps": 8},
           "targets": [9.0, 4.1], "tasks": {"tiny": task}, "methods": methods}  # fmt: skip
    compare(parse_spec(raw), lambda line: None)
    assert main(["budget-law", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "| target | C | a (model size) | b (population) |" in printed
    data = json.loads((tmp_path / "cmp" / "budget-law.json").read_text())
    assert data["targets"] == [9.0, 4.1]
    small, big = sorted({r["d"] for r in data["rows"]})
    assert sorted((r["d"], r["N"]) for r in data["rows"]) == [(small, 4), (small, 8), (big, 4)]
    assert data["fits"]["9.0"] is None  # reached at generation 0: no count to fit
    assert [r["targets"]["4.1"]["gradient_steps"] is not None for r in data["rows"]] == [True, True, False]
    for row in data["rows"]:  # 9.0 is above the untrained loss: reached at the first evaluation
        assert row["targets"]["9.0"]["generations"] == 0
        metrics = [json.loads(line) for line in open(tmp_path / "cmp" / row["cell"] / "metrics.jsonl")]
        first = next((m for m in metrics if m["val_loss"] <= 4.1), None)
        assert row["targets"]["4.1"]["generations"] == (None if first is None else first["step"])
    assert (tmp_path / "cmp" / "budget-law.png").stat().st_size > 1000


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(UsageError, match="not a folder of runs"):
        run_budget_law(tmp_path / "missing", [2.5])
    with pytest.raises(UsageError, match="no finished runs"):
        run_budget_law(tmp_path, [2.5])
    assert main(["budget-law", str(tmp_path)]) == 2
