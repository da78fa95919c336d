"""The training loop shared by every method.

``train(cfg)`` builds the task, the model and the method named in a
:class:`TrainConfig`, then steps until ``steps`` or ``budget_minutes`` runs
out, evaluating every ``eval_every`` steps. In the output folder it writes:

* ``metrics.jsonl`` and ``metrics.csv``: one row per evaluation (step, wall_s,
  cumulative forward_tokens, train_loss, val_loss, lr, and the method's info),
* ``checkpoint.pt`` at every evaluation (see :mod:`nograd.checkpoint`),
* ``config.json``, ``loss.png`` (with matplotlib), and ``sample.txt``.

The learning rate is a pure function of the step index (linear warmup, then
cosine decay to ``lr * min_lr_ratio`` at ``lr_decay_steps``, as in nanoGPT),
so a resumed run follows the schedule exactly.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from nograd.allocator import retain_freed_memory
from nograd.checkpoint import load_checkpoint, save_checkpoint
from nograd.errors import UsageError
from nograd.methods import OUTER_OPTIMIZERS, get_method
from nograd.methods_es import ES_METHODS
from nograd.models.gpt import ATTENTION_KINDS
from nograd.plot import plot_metrics
from nograd.tasks import TASKS, build_task


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` means "the method's own default"."""

    task: str = "shakespeare-char"
    optimizer: str = "adamw"
    steps: int = 2000  # optimizer steps (the run stops at steps or budget_minutes, whichever first)
    budget_minutes: float | None = None  # cap on training wall time (evaluation excluded)
    eval_every: int = 250
    eval_batches: int = 50  # fixed validation batches (12 rows x block_size each)
    seed: int = 0
    out: str | None = None  # output folder; default runs/<task>-<optimizer>
    resume: str | None = None  # checkpoint to continue from ("auto": <out>/checkpoint.pt)
    data: str | None = None  # data file; default $NOGRAD_DATA, the cache, or a download
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads; None: torch's default (one per core)
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    attention: str = "sdpa"  # "math" for methods that use torch.func.jvp
    # optimization
    batch_size: int = 12
    lr: float | None = None  # peak learning rate; None: the method's default_lr
    warmup: int = 100  # linear warmup steps
    lr_decay_steps: int | None = None  # end of the cosine decay; None: steps
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (1.0 with warmup 0 = constant lr)
    weight_decay: float | None = None
    # forward-only methods (each method documents which it reads)
    population: int | None = None
    sigma: float | None = None
    rank: int | None = None
    eps: float | None = None
    directions: int | None = None
    outer: str | None = None  # outer optimizer applied to an ES gradient estimate
    opts: dict[str, str] = field(default_factory=dict)  # --opt KEY=VALUE, read by the method
    # output
    quiet: bool = False
    sample_chars: int = 300

    def validate(self) -> None:
        """Check every field; raise UsageError naming the flag for the first bad one."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UsageError(msg)

        def positive(name: str, value: float | None, allow_none: bool = True, zero: bool = False) -> None:
            flag = "--" + name.replace("_", "-")
            if value is None:
                need(allow_none, f"{flag} is required")
                return
            if isinstance(value, float):
                need(math.isfinite(value), f"{flag} must be a finite number, got {value}")
            need(
                value >= 0 if zero else value > 0, f"{flag} must be {'>= 0' if zero else '> 0'}, got {value}"
            )

        need(self.task in TASKS, f"unknown task {self.task!r} (known: {', '.join(sorted(TASKS))})")
        get_method(self.optimizer)  # raises UsageError for an unknown name
        positive("steps", self.steps, allow_none=False, zero=True)
        positive("budget_minutes", self.budget_minutes)
        positive("eval_every", self.eval_every, allow_none=False)
        positive("eval_batches", self.eval_batches, allow_none=False)
        need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        positive("threads", self.threads)
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size"):
            positive(name, getattr(self, name), allow_none=False)
        need(
            self.n_embd % self.n_head == 0,
            f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})",
        )
        need(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        need(self.attention in ATTENTION_KINDS, f"--attention must be one of {', '.join(ATTENTION_KINDS)}")
        positive("lr", self.lr)
        positive("warmup", self.warmup, allow_none=False, zero=True)
        positive("lr_decay_steps", self.lr_decay_steps)
        need(0.0 <= self.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        positive("weight_decay", self.weight_decay, zero=True)
        for name in ("population", "rank", "directions"):
            positive(name, getattr(self, name))
        positive("sigma", self.sigma)
        positive("eps", self.eps)
        need(
            self.outer is None or self.outer in OUTER_OPTIMIZERS,
            f"unknown --outer {self.outer!r} (choose from {', '.join(OUTER_OPTIMIZERS)})",
        )
        positive("sample_chars", self.sample_chars, allow_none=False, zero=True)
        need(
            self.device == "cpu" or self.device.startswith(("cuda", "mps")),
            f"unknown --device {self.device!r}",
        )
        if self.device.startswith("cuda"):
            need(torch.cuda.is_available(), "--device cuda given but CUDA is not available")
        for key in self.opts:
            need(bool(key) and isinstance(self.opts[key], str), f"bad --opt key {key!r}")


# Fields a resumed run may change; everything else comes from the checkpoint.
RUN_CONTROL_FIELDS = (
    "steps",
    "budget_minutes",
    "eval_every",
    "out",
    "resume",
    "data",
    "device",
    "threads",
    "quiet",
    "sample_chars",
)


def lr_scale(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for the (0-based) step ``step``; depends on the step only."""
    decay_steps = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else cfg.steps
    if step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    if step >= decay_steps:
        return cfg.min_lr_ratio
    ratio = (step - cfg.warmup) / max(1, decay_steps - cfg.warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return cfg.min_lr_ratio + coeff * (1.0 - cfg.min_lr_ratio)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a saved dict, ignoring keys this version does not know."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in names})


def resume_config(saved: TrainConfig, cfg: TrainConfig, explicit: set[str] | None = None) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with run-control fields from ``cfg``.

    ``explicit`` names the fields the user set on the command line; setting
    one that would change the run (model shape, optimizer, ...) to a value
    other than the checkpoint's is an error rather than silently ignored.
    ``lr_decay_steps`` may be changed explicitly (to stretch the schedule).
    """
    explicit = explicit or set()
    for name in sorted(explicit - set(RUN_CONTROL_FIELDS) - {"lr_decay_steps"}):
        if getattr(cfg, name) != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag} {getattr(cfg, name)} differs from the checkpoint's {getattr(saved, name)}; "
                "leave it out when resuming"
            )
    changes = {name: getattr(cfg, name) for name in RUN_CONTROL_FIELDS}
    changes["out"] = cfg.out or saved.out
    changes["data"] = cfg.data or saved.data
    if "lr_decay_steps" in explicit:
        changes["lr_decay_steps"] = cfg.lr_decay_steps
    return replace(saved, **changes)


class Progress:
    """A one-line progress bar on a terminal: step/total, loss, tokens/s, eta."""

    def __init__(self, total: int, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream
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
        line = f"[{bar}] {step}/{self.total} loss {loss:.4f} {tokens_per_s:,.0f} tok/s eta {_fmt_time(eta_s)}"
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _read_rows(path: Path, max_step: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row["step"] <= max_step:  # rows after the checkpoint belong to a lost future
                rows.append(row)
    return rows


def _write_rows(out: Path, rows: list[dict[str, Any]]) -> None:
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


def _resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill in defaults that depend on other fields, so config.json records what ran."""
    changes: dict[str, Any] = {}
    if cfg.lr is None:
        changes["lr"] = get_method(cfg.optimizer).default_lr
    if cfg.lr_decay_steps is None:
        changes["lr_decay_steps"] = cfg.steps
    if cfg.out is None:
        changes["out"] = os.path.join("runs", f"{cfg.task}-{cfg.optimizer}")
    return replace(cfg, **changes)


def train(cfg: TrainConfig, explicit: set[str] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns a summary dict (final/best val loss, wall time, ...).

    ``explicit`` (from the CLI) names the fields the user set, to catch
    conflicting flags on ``--resume``. Process-wide settings: ``cfg.threads`` sets torch's thread
    count, and an evolution strategy turns on :func:`nograd.allocator.retain_freed_memory`.
    """
    cfg.validate()
    ckpt = None
    if cfg.resume:
        path = cfg.resume
        if path == "auto":
            path = os.path.join(_resolve(cfg).out, "checkpoint.pt")
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt.get("config"), dict):
            raise UsageError(f"checkpoint {path!r} holds no training state to resume")
        cfg = resume_config(config_from_dict(ckpt["config"]), cfg, explicit)
        cfg.validate()
    cfg = _resolve(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda *a, **k: None) if cfg.quiet else print
    device = torch.device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.optimizer in ES_METHODS:  # each step evaluates a population: keep its activations' pages
        retain_freed_memory()

    info = get_method(cfg.optimizer)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg)
    model = task.build_model().to(device)

    def loss_fn(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task.per_example_loss(m, x, y)

    method = info.build(model, loss_fn, cfg)

    step, forward_tokens, wall = 0, 0.0, 0.0
    rows: list[dict[str, Any]] = []
    if ckpt is not None:
        # The attention kernel is a choice of computation, not of weights: a
        # method may switch it, so it does not have to match.
        saved_model = {k: v for k, v in ckpt.get("model_config", {}).items() if k != "attention"}
        if saved_model != {k: v for k, v in asdict(task.model_config).items() if k != "attention"}:
            raise UsageError(
                "the checkpoint's model does not match this task and data (different data file?)"
            )
        try:
            model.load_state_dict(ckpt["model"])
            method.load_state_dict(ckpt["method"])
            task.sampler.load_state_dict(ckpt["sampler"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
            step, forward_tokens, wall = ckpt["step"], ckpt["forward_tokens"], ckpt["wall_s"]
        except (KeyError, ValueError, RuntimeError) as e:
            raise UsageError(f"checkpoint cannot be resumed ({type(e).__name__}: {str(e)[:100]})") from None
        rows = _read_rows(out / "metrics.jsonl", step)
        log(f"resuming from step {step} ({forward_tokens:.3g} forward tokens, {wall:.1f}s)")
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{cfg.task} | {cfg.optimizer} | {n_params / 1e6:.2f}M parameters | out {out}")

    def checkpoint() -> None:
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {
            "config": asdict(cfg),
            "model_config": asdict(task.model_config),
            "task_meta": task.meta,
            "model": model.state_dict(),
            "method": method.state_dict(),
            "sampler": task.sampler.state_dict(),
            "rng": rng,
            "step": step,
            "forward_tokens": forward_tokens,
            "wall_s": wall,
        }
        save_checkpoint(out / "checkpoint.pt", state)

    progress = Progress(cfg.steps, enabled=not cfg.quiet)
    interval_losses: list[float] = []
    interval_info: dict[str, list[float]] = {}

    def evaluate(save: bool) -> float:
        val = task.evaluate(model)
        last_lr = cfg.lr * lr_scale(max(step - 1, 0), cfg)
        train_loss = sum(interval_losses) / len(interval_losses) if interval_losses else None
        row: dict[str, Any] = {
            "step": step,
            "wall_s": round(wall, 3),
            "forward_tokens": forward_tokens,
            "train_loss": train_loss,
            "val_loss": val,
            "lr": last_lr,
        }
        row.update({k: sum(v) / len(v) for k, v in interval_info.items() if v})
        rows.append(row)
        interval_losses.clear()
        interval_info.clear()
        _write_rows(out, rows)
        if save:
            checkpoint()
        progress.clear()
        tl = "     -" if train_loss is None else f"{train_loss:.4f}"
        log(f"step {step:>6} | train {tl} | val {val:.4f} | {forward_tokens:.3g} fwd tokens | {wall:.1f}s")
        return val

    stopped = "steps"
    budget_s = cfg.budget_minutes * 60 if cfg.budget_minutes is not None else math.inf
    if step == 0 and not rows:
        evaluate(save=False)  # the starting point of the curves
    last_eval = step
    window: list[tuple[float, int]] = []  # (seconds, tokens) of recent steps, for tok/s and eta
    try:
        while step < cfg.steps:
            if wall >= budget_s:
                stopped = "budget"
                break
            t0 = time.perf_counter()
            x, y = task.sampler.sample()
            result = method.step(x.to(device), y.to(device), lr_scale(step, cfg))
            dt = time.perf_counter() - t0
            wall += dt
            step += 1
            forward_tokens += result.forward_tokens
            interval_losses.append(result.loss)
            for k, v in result.info.items():
                interval_info.setdefault(k, []).append(float(v))
            window = (window + [(dt, x.numel())])[-50:]
            secs = sum(w[0] for w in window)
            eta = min((cfg.steps - step) * secs / len(window), budget_s - wall)
            progress.update(step, result.loss, sum(w[1] for w in window) / max(secs, 1e-9), eta)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_eval = step
                if not math.isfinite(evaluate(save=True)):
                    stopped = "diverged"
                    log("nograd: warning: validation loss is not finite; stopping")
                    break
    except KeyboardInterrupt:
        progress.clear()
        print(
            f"\ninterrupted; continue from step {last_eval} with --resume {out / 'checkpoint.pt'}",
            file=sys.stderr,
        )
        raise
    if last_eval != step or not rows:
        evaluate(save=True)
    elif step == 0:
        checkpoint()  # a 0-step run still leaves a checkpoint
    progress.clear()

    if plot_metrics(rows, out / "loss.png", title=f"{cfg.task} / {cfg.optimizer}"):
        log(f"wrote {out / 'loss.png'}")
    else:
        print(
            "nograd: warning: matplotlib is not installed, so no loss.png (pip install 'nograd[plot]')",
            file=sys.stderr,
        )
    sample = task.sample(model, chars=cfg.sample_chars, seed=cfg.seed) if cfg.sample_chars else ""
    (out / "sample.txt").write_text(sample)
    if sample and not cfg.quiet:
        print(f"--- sample ({cfg.sample_chars} chars) ---\n{sample}\n---")

    vals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    summary = {
        "out": str(out),
        "task": cfg.task,
        "optimizer": cfg.optimizer,
        "steps": step,
        "stopped": stopped,
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
        "wall_s": wall,
        "forward_tokens": forward_tokens,
        "sample": sample,
    }
    log(
        f"done: {step} steps ({stopped}), val loss {summary['final_val_loss']:.4f}, "
        f"{wall:.1f}s training, {forward_tokens:.3g} forward tokens"
    )
    return summary
