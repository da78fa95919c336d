"""`nograd compare`: a tiny spec end to end, resuming, budgets matched to another method, bad specs."""

from __future__ import annotations

import csv
import json

import pytest
from _foundation import TINY_GPT, small_text

from nograd.cli import main
from nograd.core.errors import UsageError
from nograd.workbench.compare import compare, parse_spec, reach

TINY_TASK = dict(task="shakespeare-char", **TINY_GPT, eval_every=3, sample_chars=10)


def tiny_spec(tmp_path, **changes) -> dict:
    raw = {
        "out": str(tmp_path / "cmp"),
        "seeds": [0, 1],
        "jobs": 2,
        "budget": {"steps": 6},
        "targets": [3.7, 1.0],
        "tasks": {"tiny": {**TINY_TASK, "data": str(small_text(tmp_path))}},
        "methods": {
            "adamw": {"optimizer": "adamw", "lr": 1e-2, "warmup": 0},
            "mezo": {"optimizer": "mezo", "budget": {"like": "adamw", "by": "tokens"}},
        },
    }
    raw.update(changes)
    return raw


def test_a_tiny_comparison_end_to_end_then_resumed(tmp_path):
    spec = parse_spec(tiny_spec(tmp_path))
    lines: list[str] = []
    written = compare(spec, lines.append)
    assert len(lines) == 4 and all("val_loss" in line for line in lines)
    rows = list(csv.DictReader(open(written["csv"])))
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("adamw", "0"),
        ("adamw", "1"),
        ("mezo", "0"),
        ("mezo", "1"),
    ]
    adamw = {r["seed"]: r for r in rows if r["method"] == "adamw"}
    for r in rows:
        if r["method"] == "mezo":  # equal compute: MeZO stops at the first step past adamw's tokens
            spent, ref = float(r["forward_tokens"]), float(adamw[r["seed"]]["forward_tokens"])
            assert ref <= spent < ref + 2 * 4 * 16 + 1  # at most one more step (2 forwards of 4 x 16)
        assert r["stopped"] in ("steps", "budget")
        assert r["steps_to_1"] == ""  # a level nobody reaches here
    assert adamw["0"]["steps_to_3.7"] == "3"  # from 3.77 at step 0 to 3.64 at step 3
    table = written["table"].read_text()
    assert "| adamw (`adamw`) | 6 steps | 6 ± 0 |" in table and "not reached" in table
    assert "adamw's forward-token-equivalents" in table
    assert [p.name for p in written["plots"]] == ["tiny-tokens.png", "tiny-wall.png"]
    assert all(p.stat().st_size > 1000 for p in written["plots"])

    # a second run reuses every finished cell ...
    logs = {p: p.stat().st_size for p in (tmp_path / "cmp").rglob("train.log")}
    compare(parse_spec(tiny_spec(tmp_path)), lambda line: None)
    assert logs == {p: p.stat().st_size for p in (tmp_path / "cmp").rglob("train.log")}
    # ... and a cell that stopped part-way continues from its checkpoint
    cell = tmp_path / "cmp" / "tiny" / "adamw" / "seed-1"
    (cell / "summary.json").unlink()
    compare(parse_spec(tiny_spec(tmp_path)), lambda line: None)
    assert "--resume" in (cell / "train.log").read_text().splitlines()[-1]
    assert json.loads((cell / "summary.json").read_text())["steps"] == 6
    # changed flags for a finished cell: an error, never a silent overwrite
    changed = tiny_spec(tmp_path)
    changed["methods"]["adamw"]["lr"] = 3e-2
    with pytest.raises(UsageError, match="holds a run with other flags"):
        compare(parse_spec(changed), lambda line: None)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(colour="red"), "unknown spec key 'colour'"),
        (dict(methods={}), r"at least one \[methods.NAME\]"),
        (dict(budget={"hours": 1}), "budget takes one of"),
        (dict(budget={"steps": -3}), "positive number"),
        (dict(budget={"steps": 2.5}), "whole number"),
        (dict(seeds=[0, 0]), "must not repeat"),
        (dict(jobs=0), "jobs must be a whole number >= 1"),
        (dict(methods={"m": {"optimizer": "mezo", "budget": {"like": "nope"}}}), "like = 'nope'"),
        (dict(methods={"m": {"lr": 1.0}}), "needs optimizer"),
        (dict(targets="low"), "targets must be a list"),
    ],
)
def test_bad_specs_are_refused_by_name(tmp_path, change, message):
    with pytest.raises(UsageError, match=message):
        parse_spec(tiny_spec(tmp_path, **change))


def test_a_bad_cell_config_is_refused_before_any_cell_runs(tmp_path):
    raw = tiny_spec(tmp_path)
    raw["methods"]["mezo"] = {"optimizer": "mezo", "lr": -1.0}
    with pytest.raises(UsageError, match=r"tiny/mezo/seed-0: .*--lr"):
        compare(parse_spec(raw), lambda line: None)
    assert not list((tmp_path / "cmp").rglob("train.log"))  # nothing ran, not even adamw


def test_the_flags_form_of_the_command(tmp_path, capsys):
    data = small_text(tmp_path)
    sets = [f"--set={k}={v}" for k, v in TINY_TASK.items() if k != "task"]
    args = ["compare", "--task", "shakespeare-char", "--methods", "adamw", "--steps", "3", "--target", "4.1"]
    assert main([*args, *sets, f"--set=data={data}", "--out", str(tmp_path / "f")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "f" / "results.md").read_text().count("| adamw") == 1
    assert main(["compare", "--task", "shakespeare-char"]) == 2
    assert "--methods" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read spec" in capsys.readouterr().err


def test_reach_finds_the_first_evaluation_past_a_target():
    rows = [
        {"step": 0, "wall_s": 0.0, "forward_tokens": 0.0, "loss": 4.0},
        {"step": 5, "wall_s": 1.0, "forward_tokens": 10.0, "loss": float("nan")},
        {"step": 10, "wall_s": 2.0, "forward_tokens": 20.0, "loss": 2.9},
        {"step": 15, "wall_s": 3.0, "forward_tokens": 30.0, "loss": 2.5},
    ]
    assert reach(rows, "loss", "min", 3.0) == {"steps": 10, "wall_s": 2.0, "tokens": 20.0}
    assert reach(rows, "loss", "min", 1.0) is None
    assert reach(rows, "loss", "max", 3.5) == {"steps": 0, "wall_s": 0.0, "tokens": 0.0}


def test_zero_steps_evaluate_only_and_only_runs_some_methods(tmp_path):
    raw = tiny_spec(tmp_path, seeds=[0], jobs=1)
    raw["methods"]["zero-shot"] = {"optimizer": "mezo", "budget": {"steps": 0}}
    spec = parse_spec(raw)
    spec.only(["zero-shot", "mezo"])  # mezo's budget is adamw's: adamw stays
    assert list(spec.methods) == ["adamw", "mezo", "zero-shot"]
    with pytest.raises(UsageError, match="not a method of the spec"):
        spec.only(["nope"])
    spec.only(["zero-shot"])
    rows = compare(spec, lambda line: None)["rows"]
    assert [(r["method"], r["steps"], r["forward_tokens"]) for r in rows] == [("zero-shot", 0, 0.0)]
    assert not (tmp_path / "cmp" / "tiny" / "adamw").exists()


def test_a_method_may_set_its_own_model_and_threads(tmp_path):
    raw = tiny_spec(tmp_path, threads=1)
    raw["methods"]["wide"] = {"optimizer": "adamw", "dropout": 0.1, "threads": 2}
    spec = parse_spec(raw)
    wide = next(c for c in spec.cells() if c.method == "wide")
    command = wide.command({})
    assert command[command.index("--dropout") + 1] == "0.1" and command.count("--threads") == 1
    assert command[command.index("--threads") + 1] == "2"
    wide.check()
    raw["methods"]["wide"]["n_layer"] = 2  # the task sets n_layer too
    clash = next(c for c in parse_spec(raw).cells() if c.method == "wide")
    with pytest.raises(UsageError, match="'n_layer' is set by both"):
        clash.values()
