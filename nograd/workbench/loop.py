"""The training loop shared by every task and method.

``train(cfg)`` builds the task, the model and the method named in a
:class:`~nograd.workbench.config.TrainConfig`, then steps until ``steps``, ``budget_minutes``
or ``budget_tokens`` runs out, evaluating every ``eval_every`` steps. It is :class:`Run` in five parts:
:meth:`Run.setup` (config, task, model, method, a checkpoint to resume), :meth:`Run.step`,
:meth:`Run.evaluate`, :meth:`Run.checkpoint` and :meth:`Run.finish`. In the output folder:

* ``metrics.jsonl`` and ``metrics.csv`` (:mod:`nograd.workbench.metrics`),
* ``checkpoint.pt`` at every evaluation (:mod:`nograd.workbench.checkpoint`),
* ``config.json``, ``loss.png`` (with matplotlib: every metric, with the task's reference
  levels), ``sample.txt`` (what the task shows at the end) and ``summary.json`` (the run's
  summary and its metrics' goals and reference levels; ``nograd compare`` reads it).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the processes join one ``torch.distributed`` group
(gloo on CPU, NCCL on CUDA) before the method is built, and the methods share their work
(:mod:`nograd.core.distributed`; gradient methods run under DDP). Every rank holds the same
weights and takes the same decisions (the wall time that the budget reads is the largest of
the ranks'); rank 0 alone logs and writes files. Every ``dist_check_every`` steps the ranks
compare a hash of their weights. A rank that dies or hangs makes the others stop within
``dist_timeout`` seconds with :class:`~nograd.core.errors.RunAborted`; the run resumes from its
last checkpoint, with any number of processes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from nograd.core import gemm
from nograd.core.allocator import available_bytes, retain_freed_memory
from nograd.core.distributed import Collective, default_group
from nograd.core.errors import RunAborted, UsageError, first_line
from nograd.tasks import get_task
from nograd.tasks.base import Task
from nograd.workbench.checkpoint import load_checkpoint, save_checkpoint
from nograd.workbench.config import (
    TrainConfig,
    config_from_dict,
    config_to_dict,
    lr_scale,
    resolve,
    resume_config,
    resume_path,
    task_options,
)
from nograd.workbench.methods_es import ES_DEFAULTS
from nograd.workbench.metrics import read_rows, write_rows
from nograd.workbench.plot import plot_metrics
from nograd.workbench.progress import Progress
from nograd.workbench.registry import Method, MethodInfo, get_method


def _writable_folder(path: Path) -> None:
    """Create ``path`` and check that a file can be written there, before any work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to the output folder {str(path)!r}: {e.strerror or e}") from None


def join_processes(cfg: TrainConfig) -> bool:
    """Join the processes that torchrun started (``WORLD_SIZE`` > 1); True when this call did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise UsageError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if cfg.device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.dist_timeout))
    except (RuntimeError, ValueError) as e:
        raise RunAborted(f"could not join the other processes ({first_line(e)})") from None
    return True


class TaskLoss:
    """The task's per-example loss as methods call it, ``loss_fn(model, x, y) -> (N,)``.

    ``sample_targets(model, x, generator) -> y`` draws targets from the model's own predictions
    (SophiaG's Hessian estimate) when the task can; otherwise it is None.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.sample_targets = getattr(task, "sample_targets", None)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.task.per_example_loss(model, x, y)


DEFAULT_MEMORY_HINT = "lower --batch-size, --population, --block-size or the model's size"


def _check_memory(cfg: TrainConfig, info: MethodInfo) -> None:
    """Refuse, with the numbers, a run whose task says it cannot fit in the available memory."""
    task_cls = get_task(cfg.task)
    estimate = getattr(task_cls, "estimate_bytes", None)
    available = available_bytes()
    if estimate is None or available is None or cfg.device != "cpu":
        return
    population = 1
    if info.population:
        population = cfg.population or ES_DEFAULTS.get(info.name, {}).get("population") or 1
    need = estimate(task_options(cfg), population, backward=not info.forward_only)
    if need > available:
        raise UsageError(
            f"this run needs at least {need / 2**30:.1f} GiB of memory and {available / 2**30:.1f} GiB is "
            f"available: {getattr(task_cls, 'memory_hint', DEFAULT_MEMORY_HINT)}"
        )


@dataclass
class Run:
    """One training run: what :func:`train` builds, then steps, evaluates and saves."""

    cfg: TrainConfig
    info: MethodInfo
    task: Task
    model: nn.Module
    method: Method
    out: Path
    device: torch.device
    step_count: int = 0
    forward_tokens: float = 0.0
    wall: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    interval_losses: list[float] = field(default_factory=list)
    interval_info: dict[str, list[float]] = field(default_factory=dict)
    window: list[tuple[float, float]] = field(default_factory=list)  # (seconds, tokens) of recent steps
    last_eval: int = 0
    last_sample_step: int = -1  # the step of the last --sample-every sample
    collective: Collective = field(default_factory=Collective)
    joined: bool = False  # this run initialised torch.distributed (and ends it)
    compile_s: float | None = None  # the first compiled population forward (--compile), once run

    @property
    def budget_s(self) -> float:
        """Training seconds the run may take (``--budget-minutes``; unbounded without it)."""
        return self.cfg.budget_minutes * 60 if self.cfg.budget_minutes is not None else math.inf

    @property
    def writer(self) -> bool:
        """Rank 0 (or the only process): the one that logs and writes files."""
        return self.collective.rank == 0

    # ------------------------------------------------------------------ set up

    @classmethod
    def setup(cls, cfg: TrainConfig, explicit: set[str] | None = None) -> Run:
        """Check the config, merge a checkpoint's, build everything; no step is taken."""
        cfg.validate()
        ckpt = None
        if cfg.resume:
            path = resume_path(cfg)
            ckpt = load_checkpoint(path)
            if not isinstance(ckpt.get("config"), dict):
                raise UsageError(f"checkpoint {path!r} holds no training state to resume")
            try:
                saved = config_from_dict(ckpt["config"])
            except TypeError as e:
                raise UsageError(f"checkpoint {path!r} has a config this version cannot read ({e})") from None
            cfg = resume_config(saved, cfg, explicit)
            cfg.validate()
        cfg = resolve(cfg)
        joined = join_processes(cfg)
        collective = Collective(default_group())
        if collective.rank != 0:
            cfg = replace(cfg, quiet=True)
        out = Path(cfg.out)
        if collective.rank == 0:
            _writable_folder(out)
        device = torch.device(cfg.device)
        if device.type == "cuda" and collective.active and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        info = get_method(cfg.optimizer)
        if info.population:  # each step evaluates a population: keep its activations' pages
            retain_freed_memory()
        _check_memory(cfg, info)
        torch.manual_seed(cfg.seed)
        task = get_task(cfg.task)(task_options(cfg), cfg.seed)
        model = task.build_model().to(device)
        run = cls(cfg, info, task, model, info.build(model, TaskLoss(task), cfg), out, device)
        run.collective, run.joined = collective, joined
        if ckpt is not None:
            run._restore(ckpt)
        if run.writer:
            (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        procs = f" | {collective.world_size} processes" if collective.active else ""
        run.log(f"{cfg.task} | {cfg.optimizer} | {n_params / 1e6:.2f}M parameters{procs} | out {out}")
        return run

    def _restore(self, ckpt: dict[str, Any]) -> None:
        # The attention kernel is a choice of computation, not of weights: a method may switch
        # it, so it does not have to match.
        # A field added since the checkpoint was written reads as its default.
        spec = self.task.model_config
        defaults = {f.name: f.default for f in fields(spec) if f.default is not MISSING}
        saved = {**defaults, **ckpt.get("model_config", {})}
        saved_model = {k: v for k, v in saved.items() if k != "attention"}
        if saved_model != {k: v for k, v in asdict(spec).items() if k != "attention"}:
            raise UsageError(
                "the checkpoint's model does not match this task and data (different data file?)"
            )
        try:
            load = getattr(self.task, "load_model_state", None)  # e.g. LoRA: the adapters only
            load(self.model, ckpt["model"]) if load else self.model.load_state_dict(ckpt["model"])
            self.method.load_state_dict(ckpt["method"])
            self.task.sampler.load_state_dict(ckpt["sampler"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
            self.step_count, self.forward_tokens, self.wall = (
                ckpt["step"],
                ckpt["forward_tokens"],
                ckpt["wall_s"],
            )
        except (KeyError, ValueError, RuntimeError) as e:
            raise UsageError(f"checkpoint cannot be resumed ({type(e).__name__}: {str(e)[:100]})") from None
        self.rows = read_rows(self.out / "metrics.jsonl", self.step_count)
        self.last_eval = self.last_sample_step = self.step_count
        self.log(
            f"resuming from step {self.step_count} ({self.forward_tokens:.3g} forward tokens, "
            f"{self.wall:.1f}s)"
        )

    def log(self, message: str) -> None:
        if not self.cfg.quiet:
            print(message)

    # ------------------------------------------------------------------ step

    def step(self, progress: Progress) -> None:
        """One optimizer step on the next training batch; training time and tokens are counted."""
        cfg = self.cfg
        t0 = time.perf_counter()
        sent = Collective.sent_total
        x, y = self.task.sampler.sample()
        result = self.method.step(x.to(self.device), y.to(self.device), lr_scale(self.step_count, cfg))
        dt = time.perf_counter() - t0
        self.wall += dt
        if self.collective.active:
            result.info["dist_bytes"] = float(Collective.sent_total - sent)
            if cfg.budget_minutes is not None:  # every rank stops at the same step
                self.wall = self.collective.max(self.wall)
        self.step_count += 1
        if cfg.compile and self.compile_s is None:
            self.compile_s = getattr(self.method, "compile_seconds", None)
            if self.compile_s is not None:
                progress.clear()
                self.log(f"compiled the population forward: the first generation took {self.compile_s:.1f}s")
        if self.collective.active and cfg.dist_check_every and self.step_count % cfg.dist_check_every == 0:
            self.collective.check_same([p.detach() for p in self.model.parameters()])
        self.forward_tokens += result.forward_tokens
        self.interval_losses.append(result.loss)
        for k, v in result.info.items():
            self.interval_info.setdefault(k, []).append(float(v))
        # a population method's rate counts every member's tokens; the others, the batch's
        tokens = result.forward_tokens if self.info.population else float(x.numel())
        self.window = (self.window + [(dt, tokens)])[-50:]
        secs = sum(w[0] for w in self.window)
        eta = min((cfg.steps - self.step_count) * secs / len(self.window), self.budget_s - self.wall)
        progress.update(self.step_count, result.loss, sum(w[1] for w in self.window) / max(secs, 1e-9), eta)

    # ------------------------------------------------------------------ evaluate

    def evaluate(self, save: bool) -> dict[str, float]:
        """Score the model, append a metrics row, rewrite the metrics files, checkpoint if ``save``."""
        values = self.task.evaluate(self.model)
        train_loss = sum(self.interval_losses) / len(self.interval_losses) if self.interval_losses else None
        row: dict[str, Any] = {
            "step": self.step_count,
            "wall_s": round(self.wall, 3),
            "forward_tokens": self.forward_tokens,
            "train_loss": train_loss,
            **values,
            "lr": self.cfg.lr * lr_scale(max(self.step_count - 1, 0), self.cfg),
        }
        row.update({k: sum(v) / len(v) for k, v in self.interval_info.items() if v})
        self.rows.append(row)
        self.interval_losses.clear()
        self.interval_info.clear()
        if self.writer:
            write_rows(self.out, self.rows)
        self.last_eval = self.step_count
        if save:
            self.checkpoint()
        tl = "     -" if train_loss is None else f"{train_loss:.4f}"
        shown = " | ".join(f"{k} {v:.4f}" for k, v in values.items())
        self.log(
            f"step {self.step_count:>6} | train {tl} | {shown} | {self.forward_tokens:.3g} fwd tokens "
            f"| {self.wall:.1f}s"
        )
        every = self.cfg.sample_every
        if every and self.step_count // every > self.last_sample_step // every:
            self.sample_along_the_way(values)
        return values

    def sample_along_the_way(self, values: dict[str, float]) -> None:
        """A text sample at this evaluation, printed and kept (its own generator: the run's random
        state is untouched, so a resume stays exact)."""
        text = self.task.sample(self.model, seed=self.cfg.seed)
        if text and self.writer:
            self.log(f"--- sample at step {self.step_count} ---\n{text}\n---")
        self.keep_sample(values, text)

    def keep_sample(self, values: dict[str, float], text: str) -> None:
        """Append this step's sample, with its metrics, to samples.jsonl."""
        self.last_sample_step = self.step_count
        if not text or not self.writer:
            return
        row = {"step": self.step_count, "wall_s": round(self.wall, 3), "forward_tokens": self.forward_tokens}
        with open(self.out / "samples.jsonl", "a") as f:
            f.write(json.dumps({**row, **values, "text": text}) + "\n")

    # ------------------------------------------------------------------ checkpoint

    def checkpoint(self) -> None:
        """Write everything a resumed run needs to continue bit-identically (atomic, checksummed).

        In a distributed run rank 0 writes it (every rank holds the same state)."""
        if not self.writer:
            return
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "config": config_to_dict(self.cfg),
            "model_config": asdict(self.task.model_config),
            "task_meta": self.task.meta,
            "model": self.task.model_state(self.model)
            if hasattr(self.task, "model_state")
            else self.model.state_dict(),
            "method": self.method.state_dict(),
            "sampler": self.task.sampler.state_dict(),
            "rng": rng,
            "step": self.step_count,
            "forward_tokens": self.forward_tokens,
            "wall_s": self.wall,
        }
        save_checkpoint(self.out / "checkpoint.pt", state)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        """Step until the step count or the time budget runs out, or the watched metric diverges.

        Forwards that record no gradient (every forward-only method's, and the evaluations) run
        the model's linear layers through this machine's faster float32 GEMM (:mod:`nograd.core.gemm`).
        """
        with gemm.linears_through(self.model):
            return self._train()

    def _train(self) -> dict[str, Any]:
        cfg = self.cfg
        primary = self.task.metrics[0]
        rate = "member-tok/s" if self.info.population else "tok/s"
        progress = Progress(cfg.steps, enabled=not cfg.quiet, rate_label=rate)
        stopped = "steps"
        if self.step_count == 0 and not self.rows and not cfg.skip_start_eval:
            self.evaluate(save=False)  # the starting point of the curves
        try:
            while self.step_count < cfg.steps:
                tokens_spent = cfg.budget_tokens is not None and self.forward_tokens >= cfg.budget_tokens
                if self.wall >= self.budget_s or tokens_spent:
                    stopped = "budget"
                    break
                self.step(progress)
                if self.step_count % cfg.eval_every == 0 or self.step_count == cfg.steps:
                    progress.clear()
                    if not math.isfinite(self.evaluate(save=True)[primary.name]):
                        stopped = "diverged"
                        print(f"nograd: warning: {primary.name} is not finite; stopping", file=sys.stderr)
                        break
        except KeyboardInterrupt:
            progress.clear()
            if not self.writer:
                raise
            print(
                f"\ninterrupted; continue from step {self.last_eval} with "
                f"--resume {self.out / 'checkpoint.pt'}",
                file=sys.stderr,
            )
            raise
        progress.clear()
        return self.finish(stopped)

    # ------------------------------------------------------------------ finish

    def finish(self, stopped: str) -> dict[str, Any]:
        """Last evaluation and checkpoint, the plot, the task's sample; returns the summary."""
        if self.last_eval != self.step_count or not self.rows:
            self.evaluate(save=True)
        elif self.step_count == 0:
            self.checkpoint()  # a 0-step run still leaves a checkpoint
        cfg = self.cfg
        summary: dict[str, Any] = {
            "out": str(self.out),
            "task": cfg.task,
            "optimizer": cfg.optimizer,
            "steps": self.step_count,
            "stopped": stopped,
            "metric": self.task.metrics[0].name,
            "wall_s": self.wall,
            "forward_tokens": self.forward_tokens,
            "compile_s": self.compile_s,
            "gemm": gemm.backend(),  # the float32 CPU matmul of the no-grad forwards (nograd.core.gemm)
            "parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "sample": "",
        }
        for metric in self.task.metrics:
            values = [r[metric.name] for r in self.rows if r.get(metric.name) is not None]
            summary[f"final_{metric.name}"] = values[-1] if values else None
            summary[f"best_{metric.name}"] = metric.best(values)
        if not self.writer:
            return summary
        if plot_metrics(
            self.rows, self.out / "loss.png", self.task.metrics, title=f"{cfg.task} / {cfg.optimizer}"
        ):
            self.log(f"wrote {self.out / 'loss.png'}")
        else:
            print(
                "nograd: warning: matplotlib is not installed, so no loss.png (pip install 'nograd[plot]')",
                file=sys.stderr,
            )
        export = getattr(self.task, "export", None)  # a folder that the model's own library loads
        if export is not None:
            export(self.model, self.out / "export")
            self.log(f"exported the model to {self.out / 'export'}")
        sample = "" if stopped == "diverged" else self.task.sample(self.model, seed=cfg.seed)
        (self.out / "sample.txt").write_text(sample)
        summary["sample"] = sample
        if sample:
            self.log(f"--- sample ---\n{sample}\n---")
        if cfg.sample_every and self.last_sample_step != self.step_count and self.rows:
            last = self.rows[-1]
            self.keep_sample({m.name: last[m.name] for m in self.task.metrics if m.name in last}, sample)
        metrics = [asdict(m) for m in self.task.metrics]
        (self.out / "summary.json").write_text(json.dumps({**summary, "metrics": metrics}, indent=2) + "\n")
        final = summary[f"final_{self.task.metrics[0].name}"]
        self.log(
            f"done: {self.step_count} steps ({stopped}), {self.task.metrics[0].name} "
            f"{final if final is None else f'{final:.4f}'}, {self.wall:.1f}s training, "
            f"{self.forward_tokens:.3g} forward tokens"
        )
        return summary


def train(cfg: TrainConfig, explicit: set[str] | None = None, end_group: bool = True) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (final and best of each metric, wall time, ...).

    ``explicit`` (from the CLI) names the fields the user set, to catch conflicting flags on
    ``--resume``. Process-wide settings: ``cfg.threads`` sets torch's thread count, and a
    population method turns on :func:`nograd.core.allocator.retain_freed_memory`. A process group
    this call joined is ended at the end unless ``end_group`` is False (the CLI then leaves the
    process with ``os._exit``: gloo's threads can abort a process whose group is torn down, by
    ``destroy_process_group`` or at interpreter exit, while a peer closes its connections).
    """
    run = Run.setup(cfg, explicit)
    summary = run.train()
    if run.joined:
        # rank 0 writes the plot and the sample last; the others wait for it
        run.collective.barrier()
        if end_group:
            dist.destroy_process_group()
    return summary
