"""The configuration of a training run, shared by every task, and how a resumed run merges it.

:class:`TrainConfig` holds what every task shares: the method, the budget, the evaluation
interval, the seed, the output, the device, the learning-rate schedule and the settings of the
forward-only methods. What is trained and on what (the model's shape, the batch size, the data)
is the task's own config, in ``task_config`` (see :mod:`nograd.tasks.base`).

The learning rate is a pure function of the step index (linear warmup, then cosine decay to
``lr * min_lr_ratio`` at ``lr_decay_steps``, as in nanoGPT), so a resumed run follows the
schedule exactly.

Example:
    >>> cfg = make_config(optimizer="eggroll", n_layer=1, steps=10)
    >>> cfg.task_config.n_layer, cfg.steps
    (1, 10)
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from nograd.core.errors import UsageError
from nograd.core.options import check_device, check_options, flag_name, option
from nograd.tasks import get_task
from nograd.workbench.registry import COMPILED_METHODS, OUTER_OPTIMIZERS, get_method

CONFIG_VERSION = 2
"""2: the task's options under ``task_config``; 1 (before): one flat dict with the GPT's flags."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` means "the method's (or task's) default"."""

    task: str = option("shakespeare-char", "task to train on (see `nograd tasks`)")
    optimizer: str = option("adamw", "method name (see `nograd optimizers`)")
    steps: int = option(
        2000, "optimizer steps (the run stops at --steps or --budget-minutes)", min=0, resume="new"
    )
    budget_minutes: float | None = option(
        None, "stop after this much training wall time (evaluation excluded)", above=0, resume="new"
    )
    budget_tokens: float | None = option(
        None,
        "stop once this many forward-token-equivalents are spent (a forward of a token = 1, a backward 2)",
        above=0,
        resume="new",
        metavar="FTE",
    )
    eval_every: int = option(250, "steps between evaluations and checkpoints", min=1, resume="new")
    sample_every: int = option(
        0,
        "steps between text samples, at evaluations (printed, kept in samples.jsonl; 0: at the end only)",
        min=0,
        resume="new",
    )
    skip_start_eval: bool = option(
        False, "no evaluation before the first step (when it is known, e.g. a zero-shot run's)", resume="new"
    )
    seed: int = option(0, "random seed", min=0)
    out: str | None = option(
        None, "output folder (default: runs/<task>-<optimizer>)", resume="new-or-saved", metavar="DIR"
    )
    resume: str | None = option(
        None, "checkpoint to continue from ('auto': <out>/checkpoint.pt)", resume="new", cli=False
    )
    device: str = option("cpu", "cpu or cuda", resume="new")
    threads: int | None = option(
        None,
        "torch CPU threads (default: one per core; 1 is often fastest for small models)",
        min=1,
        resume="new",
    )
    # the learning-rate schedule
    lr: float | None = option(None, "peak learning rate (default: the method's)", above=0)
    warmup: int = option(100, "linear warmup steps", min=0)
    lr_decay_steps: int | None = option(
        None, "end of the cosine decay (default: --steps; may be changed on --resume)", min=1, resume="given"
    )
    min_lr_ratio: float = option(
        0.1, "final lr as a fraction of --lr (1 with --warmup 0: constant)", min=0.0, max=1.0
    )
    weight_decay: float | None = option(None, "decoupled weight decay (default: the method's)", min=0)
    # forward-only methods (each method documents which it reads; None: the method's own default)
    population: int | None = option(None, "population size / perturbations per step", min=1)
    sigma: float | None = option(None, "perturbation scale for ES", above=0)
    rank: int | None = option(None, "rank of low-rank perturbations", min=1)
    eps: float | None = option(None, "finite-difference step for zeroth-order methods", above=0)
    directions: int | None = option(None, "random directions per step for zeroth-order methods", min=1)
    outer: str | None = option(
        None, "update rule applied to an ES gradient estimate", choices=OUTER_OPTIMIZERS
    )
    compile: bool = option(
        False,
        "run the population forward through torch.compile (eggroll, openai-es, nres; compiled once)",
        resume="new",
    )
    opts: dict[str, str] = option({}, "method-specific options (--opt KEY=VALUE)", cli=False)
    quiet: bool = option(False, "no progress bar or evaluation lines", resume="new")
    # several processes (torchrun); ignored in one process
    dist_timeout: float = option(
        120.0,
        "seconds a process waits for the others before the run stops (under torchrun)",
        above=0,
        resume="new",
    )
    dist_check_every: int = option(
        100, "steps between the processes' comparison of their weights (0: never)", min=0, resume="new"
    )
    task_config: Any = None  # the task's options (its Config dataclass); None: the task's defaults

    def validate(self) -> None:
        """Check every field and the task's options; raise UsageError naming the first bad flag."""
        get_task(self.task)  # an unknown task, before anything else
        get_method(self.optimizer)
        check_options(self)
        check_device(self.device)
        if self.compile and self.optimizer not in COMPILED_METHODS:
            raise UsageError(
                f"--compile applies to the batched population methods ({', '.join(COMPILED_METHODS)}), "
                f"not to {self.optimizer}"
            )
        for key, value in self.opts.items():
            if not key or not isinstance(value, str):
                raise UsageError(f"bad --opt key {key!r}")
        options = task_options(self)
        check = getattr(options, "validate", None)  # a task's own cross-field checks, if it has any
        check() if callable(check) else check_options(options)
        check_method = getattr(options, "check_method", None)  # e.g. an objective with no gradient
        if callable(check_method):
            check_method(get_method(self.optimizer).forward_only)


def task_options(cfg: TrainConfig) -> Any:
    """``cfg.task_config``, or the task's defaults when it is None; a UsageError if it is of another task."""
    config_cls = get_task(cfg.task).Config
    if cfg.task_config is None:
        return config_cls()
    if not isinstance(cfg.task_config, config_cls):
        raise UsageError(
            f"task_config is a {type(cfg.task_config).__name__}, but task {cfg.task!r} takes a "
            f"{config_cls.__name__}"
        )
    return cfg.task_config


def shared_fields() -> list[str]:
    """The TrainConfig fields that are options (all but task_config)."""
    return [f.name for f in fields(TrainConfig) if f.name != "task_config"]


def make_config(**values: Any) -> TrainConfig:
    """A TrainConfig from one flat set of values, split between the shared and the task's fields.

    ``task`` picks the task (default shakespeare-char); an unknown name is a UsageError naming
    the fields both accept.
    """
    task_cls = get_task(values.get("task") or TrainConfig.task)
    shared = set(shared_fields())
    own = {f.name for f in fields(task_cls.Config)}
    unknown = sorted(set(values) - shared - own)
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r} for task {task_cls.name}")
    task_values = {k: v for k, v in values.items() if k in own}
    return TrainConfig(
        **{k: v for k, v in values.items() if k in shared}, task_config=task_cls.Config(**task_values)
    )


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """What config.json and checkpoints store: the shared fields, and the task's under task_config."""
    d = {name: getattr(cfg, name) for name in shared_fields()}
    d["opts"] = dict(cfg.opts)
    d["task_config"] = dataclasses.asdict(task_options(cfg))
    d["config_version"] = CONFIG_VERSION
    return d


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from :func:`config_to_dict`'s output, or from a version-1 flat dict.

    Keys this version does not know are ignored, so a checkpoint of a newer minor version loads.
    """
    if not isinstance(d, dict):
        raise UsageError("the checkpoint's config is not a dict")
    task_cls = get_task(d.get("task", TrainConfig.task))
    own = {f.name for f in fields(task_cls.Config)}
    if "task_config" in d:
        task_values = d["task_config"]
        if not isinstance(task_values, dict):
            raise UsageError("the checkpoint's task_config is not a dict")
    else:  # version 1: the task's fields sat beside the shared ones
        task_values = d
    shared = set(shared_fields())
    return TrainConfig(
        **{k: v for k, v in d.items() if k in shared},
        task_config=task_cls.Config(**{k: v for k, v in task_values.items() if k in own}),
    )


def _merge(saved: Any, new: Any, explicit: set[str]) -> dict[str, Any]:
    """Field values of a resumed run for one dataclass (TrainConfig or a task's Config)."""
    changes = {}
    for f in fields(saved):
        if "resume" not in f.metadata:
            continue
        name, policy = f.name, f.metadata["resume"]
        new_value, saved_value = getattr(new, name), getattr(saved, name)
        if policy == "new":
            changes[name] = new_value
        elif policy == "new-or-saved":
            changes[name] = saved_value if new_value is None else new_value
        elif name in explicit:
            if policy == "given":
                changes[name] = new_value
            elif new_value != saved_value:
                raise UsageError(
                    f"{flag_name(name)} {new_value} differs from the checkpoint's {saved_value}; "
                    "leave it out when resuming"
                )
    return changes


def resume_config(saved: TrainConfig, cfg: TrainConfig, explicit: set[str] | None = None) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with run-control fields from ``cfg``.

    Each field's resume policy (:data:`nograd.core.options.RESUME_POLICIES`) decides: the budget,
    the evaluation interval, the output and the device come from ``cfg``; ``lr_decay_steps``
    may be changed explicitly (to stretch the schedule); setting any other field that the user
    names in ``explicit`` to a value other than the checkpoint's is an error rather than
    silently ignored. ``cfg.task_config`` None keeps the checkpoint's task options, except the
    run-control ones (the data path, the sample length), which take their defaults.
    """
    explicit = set(explicit or ())
    if "task" in explicit and cfg.task != saved.task:
        raise UsageError(f"--task {cfg.task} differs from the checkpoint's {saved.task}; leave it out")
    saved_task = task_options(saved)
    new_task = saved_task.__class__() if cfg.task_config is None else cfg.task_config
    if not isinstance(new_task, type(saved_task)):
        raise UsageError(f"these options are for another task than the checkpoint's ({saved.task})")
    task_changes = _merge(saved_task, new_task, explicit)
    changes = _merge(saved, cfg, explicit)  # an explicit other --task was refused above
    changes["task_config"] = replace(saved_task, **task_changes)
    return replace(saved, **changes)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill in defaults that depend on other fields, so config.json records what ran."""
    changes: dict[str, Any] = {"task_config": task_options(cfg)}
    if cfg.lr is None:
        info = get_method(cfg.optimizer)
        task_lr = getattr(get_task(cfg.task), "default_lr", None)  # a task may know better (fine-tuning)
        lr = task_lr(info.name, info.forward_only, changes["task_config"]) if task_lr else None
        changes["lr"] = info.default_lr if lr is None else lr
    if cfg.lr_decay_steps is None:
        changes["lr_decay_steps"] = cfg.steps
    if cfg.out is None:
        changes["out"] = os.path.join("runs", f"{cfg.task}-{cfg.optimizer}")
    return replace(cfg, **changes)


def resume_path(cfg: TrainConfig) -> str:
    """The checkpoint ``cfg.resume`` names: a path, or ``auto`` for ``<out>/checkpoint.pt``."""
    if cfg.resume is None:
        raise ValueError("the config resumes nothing")
    return os.path.join(resolve(cfg).out, "checkpoint.pt") if cfg.resume == "auto" else cfg.resume


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
