"""The trainer: schedule, validation, outputs, budget stop, and bit-exact resume."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from _foundation import run_cli, tiny_config

from nograd.core.errors import UsageError
from nograd.workbench import TrainConfig, lr_scale, make_config, resume_config, train
from nograd.workbench.checkpoint import load_checkpoint
from nograd.workbench.registry import (
    METHODS,
    Method,
    StepResult,
    get_method,
    load_methods,
    parse_opts,
    register_method,
)


def test_schedule_warmup_then_cosine_to_a_tenth():
    cfg = TrainConfig(steps=1000, warmup=100, lr_decay_steps=1000)
    assert lr_scale(0, cfg) == pytest.approx(1 / 101)
    assert lr_scale(99, cfg) == pytest.approx(100 / 101)
    assert lr_scale(100, cfg) == pytest.approx(1.0)
    assert lr_scale(550, cfg) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert lr_scale(1000, cfg) == pytest.approx(0.1)
    assert lr_scale(5000, cfg) == pytest.approx(0.1)
    flat = TrainConfig(warmup=0, min_lr_ratio=1.0)
    assert all(lr_scale(s, flat) == 1.0 for s in (0, 10, 5000))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(steps=-1), "--steps"),
        (dict(task="nope"), "unknown task"),
        (dict(optimizer="nope"), "unknown optimizer"),
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(batch_size=0), "--batch-size"),
        (dict(lr=-1.0), "--lr"),
        (dict(lr=float("nan")), "--lr"),
        (dict(budget_minutes=0.0), "--budget-minutes"),
        (dict(eval_every=0), "--eval-every"),
        (dict(dropout=1.0), "--dropout"),
        (dict(sigma=0.0), "--sigma"),
        (dict(population=-4), "--population"),
        (dict(outer="nope"), "--outer must be one of"),
        (dict(min_lr_ratio=2.0), "--min-lr-ratio"),
    ],
)
def test_validation(changes, message):
    with pytest.raises(UsageError, match=message):
        make_config(**changes).validate()


def test_registry_and_opts():
    methods = load_methods()
    assert {"adamw", "muon"} <= set(methods)
    assert not methods["adamw"].forward_only
    assert get_method("adamw").summary
    assert parse_opts({"beta2": "0.95", "flag": "yes"}, {"beta2": 0.99, "flag": False, "n": 3}, "m") == {
        "beta2": 0.95,
        "flag": True,
        "n": 3,
    }
    with pytest.raises(UsageError, match="unknown --opt key 'bogus'"):
        parse_opts({"bogus": "1"}, {"beta2": 0.99}, "m")
    with pytest.raises(UsageError, match="expected a int"):
        parse_opts({"n": "x"}, {"n": 3}, "m")


def test_register_method_protocol(tmp_path):
    class Frozen:
        def __init__(self, model, loss_fn, cfg):
            self.model, self.loss_fn = model, loss_fn

        def step(self, x, y, lr_scale):
            with torch.no_grad():
                losses = self.loss_fn(self.model, x, y)
            return StepResult(losses.mean().item(), float(x.numel()), {"rows": float(len(losses))})

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    register_method("test-frozen", "does nothing (test)", forward_only=True, default_lr=0.5)(Frozen)
    try:
        assert isinstance(Frozen(None, None, None), Method)
        cfg = tiny_config(tmp_path, optimizer="test-frozen")
        summary = train(cfg)
        rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
        assert rows[-1]["rows"] == 4.0 and rows[-1]["forward_tokens"] == 6 * 4 * 16
        assert rows[-1]["lr"] == pytest.approx(0.5 * lr_scale(5, cfg))  # default_lr, lr of the last step
        assert summary["final_val_loss"] == pytest.approx(rows[0]["val_loss"])  # frozen weights
    finally:
        del METHODS["test-frozen"]


def test_outputs_and_budget_stop(tmp_path):
    summary = train(tiny_config(tmp_path, budget_minutes=1e-9, steps=50))
    out = tmp_path / "run"
    assert summary["stopped"] == "budget" and summary["steps"] == 1
    for name in ("metrics.jsonl", "metrics.csv", "checkpoint.pt", "config.json", "loss.png", "sample.txt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1]
    assert {"wall_s", "forward_tokens", "train_loss", "val_loss", "lr", "grad_norm"} <= set(rows[-1])
    assert (
        open(out / "metrics.csv").readline().startswith("step,wall_s,forward_tokens,train_loss,val_loss,lr")
    )
    assert json.load(open(out / "config.json"))["lr"] == 1e-3  # the method's default, resolved
    assert len(summary["sample"]) == 1 + 20  # the "\n" prompt, then 20 sampled characters


def _tensors(obj, prefix=""):
    """Flatten nested dicts/lists into {path: tensor-or-value}."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {prefix: obj}
    flat = {}
    for k, v in items:
        flat.update(_tensors(v, f"{prefix}/{k}"))
    return flat


def _assert_identical(a: dict, b: dict) -> None:
    fa, fb = _tensors(a), _tensors(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            assert torch.equal(fa[k], fb[k]), k
        else:
            assert fa[k] == fb[k], k


def test_exact_resume_in_a_new_process(tmp_path):
    # 6 steps in one go ...
    # dropout: the global RNG matters too
    one = tiny_config(tmp_path, out=str(tmp_path / "one"), dropout=0.1)
    train(one)
    # ... versus 3 steps (same schedule horizon), then 3 more from the checkpoint in a fresh process.
    two = replace(one, out=str(tmp_path / "two"), steps=3, lr_decay_steps=6)
    train(two)
    r = run_cli(
        "train",
        "--resume",
        str(tmp_path / "two" / "checkpoint.pt"),
        "--steps",
        "6",
        "--out",
        str(tmp_path / "two"),
        "--quiet",
        "--sample-chars",
        "20",
    )
    assert r.returncode == 0, r.stderr
    a, b = (
        load_checkpoint(tmp_path / "one" / "checkpoint.pt"),
        load_checkpoint(tmp_path / "two" / "checkpoint.pt"),
    )
    assert a["step"] == b["step"] == 6
    for key in ("model", "method", "sampler", "rng", "forward_tokens"):
        _assert_identical(a[key], b[key])
    rows = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 3, 6]
    assert (tmp_path / "one" / "sample.txt").read_text() == (tmp_path / "two" / "sample.txt").read_text()


def test_exact_resume_muon(tmp_path):
    cfg = tiny_config(tmp_path, optimizer="muon", out=str(tmp_path / "one"), steps=4, eval_every=2)
    train(cfg)
    train(replace(cfg, out=str(tmp_path / "two"), steps=2, lr_decay_steps=4))
    train(replace(cfg, out=str(tmp_path / "two"), resume="auto"))
    a, b = (
        load_checkpoint(tmp_path / "one" / "checkpoint.pt"),
        load_checkpoint(tmp_path / "two" / "checkpoint.pt"),
    )
    _assert_identical(a["model"], b["model"])
    _assert_identical(a["method"], b["method"])


def test_resume_rejects_conflicting_flags(tmp_path):
    cfg = tiny_config(tmp_path, steps=2)
    train(cfg)
    resumed = replace(cfg, resume="auto", task_config=replace(cfg.task_config, n_embd=32), steps=4)
    with pytest.raises(UsageError, match="--n-embd 32 differs from the checkpoint's 16"):
        train(resumed, explicit={"n_embd", "resume", "steps"})
    # Fields the user did not give come from the checkpoint.
    merged = resume_config(cfg, replace(TrainConfig(), steps=9, out=cfg.out), explicit={"steps"})
    assert merged.task_config.n_embd == 16 and merged.steps == 9


def test_training_reduces_loss(tmp_path):
    summary = train(tiny_config(tmp_path, steps=40, eval_every=40, lr=1e-2, warmup=0))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert summary["final_val_loss"] < rows[0]["val_loss"] - 0.5
    assert math.isfinite(summary["wall_s"])


def test_progress_bar_only_on_a_terminal():
    import io

    from nograd.workbench.progress import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = Progress(10, enabled=True, stream=stream)
        p.update(10, 1.5, 1234.0, 65.0)
        p.clear()
    assert "10/10" in tty.getvalue() and "loss 1.5000" in tty.getvalue() and "eta 1:05" in tty.getvalue()
    assert pipe.getvalue() == ""


def test_a_diverging_run_stops_and_keeps_no_sample(tmp_path):
    summary = train(tiny_config(tmp_path, lr=1e21, warmup=0, steps=6, eval_every=1))
    assert summary["stopped"] == "diverged" and summary["sample"] == ""
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_skip_start_eval_leaves_out_the_step_0_row(tmp_path):
    summary = train(tiny_config(tmp_path, steps=3, eval_every=3, skip_start_eval=True))
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [3] and summary["steps"] == 3


def test_samples_along_the_way_and_after_a_resume(tmp_path):
    """--sample-every: a sample at the start, at each multiple of it, and at the end, in
    samples.jsonl with the metric; a resumed run continues the file and stays exact."""
    one = tiny_config(tmp_path, out=str(tmp_path / "one"), steps=8, eval_every=2, sample_every=4)
    train(one)
    rows = [json.loads(line) for line in open(tmp_path / "one" / "samples.jsonl")]
    assert [r["step"] for r in rows] == [0, 4, 8]
    assert all(len(r["text"]) > 0 and math.isfinite(r["val_loss"]) for r in rows)
    assert rows[-1]["text"] == (tmp_path / "one" / "sample.txt").read_text()
    metrics = {r["step"]: r["val_loss"] for r in map(json.loads, open(tmp_path / "one" / "metrics.jsonl"))}
    assert all(r["val_loss"] == metrics[r["step"]] for r in rows)
    two = replace(one, out=str(tmp_path / "two"), steps=6, lr_decay_steps=8)
    train(two)
    train(replace(two, steps=8, resume="auto"))
    again = [json.loads(line) for line in open(tmp_path / "two" / "samples.jsonl")]
    assert [r["step"] for r in again] == [0, 4, 6, 8]  # the first run's end, then the resumed one's
    assert again[-1]["text"] == rows[-1]["text"]
    _assert_identical(
        load_checkpoint(tmp_path / "one" / "checkpoint.pt")["model"],
        load_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"],
    )
