"""Tasks own their model, flags and metrics; the trainer knows none of them in advance."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _foundation import shakespeare_path, small_text, tiny_config

from nograd.cli import main
from nograd.core.errors import UsageError
from nograd.core.options import check_options, option
from nograd.tasks import TASKS
from nograd.tasks.base import Metric
from nograd.tasks.shakespeare import ShakespeareCharConfig, ngram_levels
from nograd.workbench import make_config, train
from nograd.workbench.checkpoint import load_checkpoint

DATA = Path(__file__).resolve().parent / "data"


# ------------------------------------------------------------------ a task the trainer has never seen


@dataclass
class SignsConfig:
    width: int = option(16, "hidden units", min=1)
    batch_size: int = option(32, "rows per step", min=1)


class _Stream:
    def __init__(self, w: torch.Tensor, batch: int, seed: int) -> None:
        self.w, self.batch = w, batch
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(self.batch, self.w.numel(), generator=self.generator)
        return x, (x @ self.w > 0).long()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class SignsTask:
    """Is a random projection of x positive? An MLP classifier, scored by loss and accuracy."""

    name = "signs"
    summary = "test task: the sign of a fixed projection"
    Config = SignsConfig

    def __init__(self, config: SignsConfig, seed: int) -> None:
        w = torch.randn(8, generator=torch.Generator().manual_seed(99))
        self.config, self.sampler = config, _Stream(w, config.batch_size, seed)
        held_out = _Stream(w, 512, seed=12345)
        self.val = held_out.sample()
        self.model_config = config
        self.meta = {}
        self.metrics = (
            Metric("val_loss", "min", "cross-entropy", {"chance": math.log(2)}),
            Metric("accuracy", "max", "accuracy", {"chance": 0.5}),
        )

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, self.config.width), nn.Tanh(), nn.Linear(self.config.width, 2))

    def per_example_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y, reduction="none")

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        x, y = self.val
        logits = model(x)
        return {
            "val_loss": F.cross_entropy(logits, y).item(),
            "accuracy": (logits.argmax(1) == y).float().mean().item(),
        }

    def sample(self, model: nn.Module, seed: int) -> str:
        return ""


@pytest.fixture
def signs_task():
    TASKS["signs"] = SignsTask
    yield SignsTask
    del TASKS["signs"]


def test_a_new_task_trains_with_its_own_flags_and_metrics(tmp_path, signs_task):
    cfg = make_config(
        task="signs",
        width=8,
        optimizer="adamw",
        lr=3e-2,
        steps=60,
        eval_every=20,
        warmup=0,
        out=str(tmp_path / "run"),
        quiet=True,
    )
    summary = train(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 20, 40, 60]
    assert {"val_loss", "accuracy", "train_loss"} <= set(rows[-1])
    assert rows[-1]["accuracy"] > max(0.8, rows[0]["accuracy"])
    # best follows each metric's goal: the lowest loss, the highest accuracy
    assert summary["best_accuracy"] == max(r["accuracy"] for r in rows)
    assert summary["best_val_loss"] == min(r["val_loss"] for r in rows)
    assert summary["metric"] == "val_loss"
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["task_config"] == {"width": 8, "batch_size": 32} and "n_layer" not in saved
    assert (tmp_path / "run" / "loss.png").is_file()


def test_a_task_flags_are_its_own(capsys, signs_task):
    with pytest.raises(SystemExit):
        main(["train", "--task", "signs", "--help"])
    text = capsys.readouterr().out
    assert "task signs" in text and "--width" in text and "hidden units (default: 16)" in text
    assert "--n-layer" not in text and "--data" not in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])  # the default task's
    text = capsys.readouterr().out
    assert "task shakespeare-char" in text and "--n-layer" in text and "--width" not in text
    assert main(["train", "--task", "signs", "--n-layer", "2"]) == 2
    assert "unrecognized arguments: --n-layer 2" in capsys.readouterr().err


def test_unknown_option_for_a_task():
    with pytest.raises(UsageError, match="unknown option 'width' for task shakespeare-char"):
        make_config(width=3)
    assert main(["train", "--task", "nope", "--help"]) == 2


def test_tasks_command_lists_tasks(capsys):
    assert main(["tasks"]) == 0
    assert "shakespeare-char" in capsys.readouterr().out


# ------------------------------------------------------------------ shakespeare-char's reference levels


def test_ngram_levels_by_hand():
    ids = torch.tensor([0, 1] * 500)  # "abab...": every bigram is determined
    levels = ngram_levels(ids[:900], ids[900:], vocab_size=2)
    assert levels["uniform"] == pytest.approx(math.log(2))
    assert levels["unigram"] == pytest.approx(math.log(2), abs=1e-6)  # a and b equally often
    # after a comes b 449 times of 449: p = (449 + 0.1) / (449 + 0.2)
    assert levels["bigram"] == pytest.approx(-math.log(449.1 / 449.2), rel=0.01)
    assert levels["trigram"] < 1e-3


def test_ngram_levels_of_tiny_shakespeare_match_the_reference():
    from nograd.tasks.data import CharData

    data = CharData.load(shakespeare_path())
    levels = ngram_levels(data.train, data.val, len(data.vocab))
    # REFERENCE.md: uniform 4.17, unigram 3.35, bigram 2.48, trigram 2.05
    assert [round(levels[k], 2) for k in ("uniform", "unigram", "bigram", "trigram")] == [
        4.17,
        3.35,
        2.48,
        2.05,
    ]


def test_reference_levels_reach_the_plot(tmp_path, monkeypatch):
    import nograd.workbench.loop as loop

    seen = {}

    def spy(rows, path, metrics, title=""):
        seen["metrics"] = metrics
        return True

    monkeypatch.setattr(loop, "plot_metrics", spy)
    train(tiny_config(tmp_path, steps=1))
    (metric,) = seen["metrics"]
    assert metric.name == "val_loss" and set(metric.references) == {"uniform", "unigram", "bigram", "trigram"}


# ------------------------------------------------------------------ checkpoints of the flat (v1) config


def _resume_to_step4(tmp_path: Path, checkpoint: Path, out: str) -> dict:
    cfg = make_config(
        resume=str(checkpoint),
        data=str(small_text(tmp_path)),  # the same text the fixtures were trained on
        steps=4,
        out=str(tmp_path / out),
        quiet=True,
        sample_chars=20,
    )
    train(cfg, explicit={"resume", "data", "steps", "out", "quiet", "sample_chars"})
    return load_checkpoint(tmp_path / out / "checkpoint.pt")


@pytest.mark.parametrize("method", ["adamw", "eggroll"])
def test_a_checkpoint_of_the_previous_layout_resumes_exactly(tmp_path, method):
    """Written by the trainer before the layering (its config one flat dict), resumed from step 2
    to step 4: bit for bit what the same state resumes to when its config is in today's layout,
    and what the old trainer wrote at step 4. The fixtures came from another CPU, whose matmul
    kernels round differently, so their weights are compared to float rounding (a state read
    wrongly moves them by about the learning rate, 1e-3), the random streams bit for bit."""
    from nograd.workbench.checkpoint import save_checkpoint
    from nograd.workbench.config import config_from_dict, config_to_dict

    old = load_checkpoint(DATA / f"v1-{method}-step2.pt")
    assert "n_layer" in old["config"] and "task_config" not in old["config"]
    today = {**old, "config": config_to_dict(config_from_dict(old["config"]))}
    assert "task_config" in today["config"]
    save_checkpoint(tmp_path / "today.pt", today)

    got = _resume_to_step4(tmp_path, DATA / f"v1-{method}-step2.pt", "old-layout")
    same = _resume_to_step4(tmp_path, tmp_path / "today.pt", "today-layout")
    want = load_checkpoint(DATA / f"v1-{method}-step4.pt")
    assert got["step"] == 4 and got["config"]["task_config"]["n_layer"] == 1
    assert set(got["model"]) == set(want["model"]) == set(same["model"])
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], same["model"][name]), name
        torch.testing.assert_close(got["model"][name], tensor, rtol=0, atol=1e-5, msg=name)
        assert not torch.equal(old["model"][name], tensor), name  # the two steps moved it
    assert torch.equal(got["sampler"]["generator"], want["sampler"]["generator"])
    assert torch.equal(got["rng"]["torch"], want["rng"]["torch"])


def test_a_checkpoint_config_this_version_cannot_read_is_refused(tmp_path):
    from nograd.workbench.checkpoint import save_checkpoint

    ckpt = load_checkpoint(DATA / "v1-adamw-step2.pt")
    ckpt["config"] = {"task": "shakespeare-char", "task_config": [1, 2]}
    save_checkpoint(tmp_path / "bad.pt", ckpt)
    with pytest.raises(UsageError, match="task_config is not a dict"):
        train(make_config(resume=str(tmp_path / "bad.pt"), out=str(tmp_path / "o")))


# ------------------------------------------------------------------ options: checked by class


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(lr=1e308), r"--lr 1e\+308 is too large for float32"),
        (dict(sigma=float("inf")), "--sigma must be a finite number"),
        (dict(steps=2**70), "does not fit in a 64-bit integer"),
        (dict(steps=2.5), "--steps must be a whole number"),
        (dict(attention="flash"), "--attention must be one of sdpa, math"),
        (dict(n_layer=0), "--n-layer must be >= 1"),
        (dict(dropout=1.0), "--dropout must be < 1.0"),
        (dict(min_lr_ratio=-0.5), "--min-lr-ratio must be >= 0.0"),
    ],
)
def test_options_are_checked_by_class(changes, message):
    with pytest.raises(UsageError, match=message):
        make_config(**changes).validate()


def test_check_options_on_any_config():
    check_options(ShakespeareCharConfig())
    with pytest.raises(UsageError, match="--batch-size must be >= 1, got 0"):
        check_options(replace(ShakespeareCharConfig(), batch_size=0))


def test_cli_refuses_a_float32_overflow_and_an_unwritable_out(tmp_path, capsys):
    data = str(small_text(tmp_path))
    assert main(["train", "--data", data, "--lr", "1e308", "--out", str(tmp_path / "o")]) == 2
    assert "too large for float32" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--data", data, "--steps", "1", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nograd: error: cannot write to the output folder") and err.count("\n") == 1


# ------------------------------------------------------------------ the progress bar's rate


def test_population_methods_count_member_tokens(tmp_path):
    from nograd.workbench.loop import Run
    from nograd.workbench.progress import Progress

    runs = {}
    for name in ("eggroll", "mezo"):
        cfg = tiny_config(tmp_path, optimizer=name, population=8, out=str(tmp_path / name))
        run = Run.setup(cfg)
        run.step(Progress(1, enabled=False))
        runs[name] = run.window[-1][1]
    batch_tokens = 4 * 16  # batch_size x block_size of tiny_config
    assert runs["eggroll"] == 8 * batch_tokens  # every member's rows
    assert runs["mezo"] == batch_tokens


def test_progress_bar_shows_its_rate_label():
    import io

    from nograd.workbench.progress import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    p = Progress(10, enabled=True, stream=stream, rate_label="member-tok/s")
    p.update(10, 1.5, 4096.0, 5.0)
    assert "4,096 member-tok/s" in stream.getvalue()


def test_a_run_that_cannot_fit_is_refused_with_the_numbers(tmp_path, capsys):
    data = str(small_text(tmp_path))
    for argv in (["--batch-size", "100000000"], ["--optimizer", "eggroll", "--population", "100000"]):
        assert main(["train", "--data", data, "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err
        assert "this run needs at least" in err and "GiB is available" in err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()
