"""What the trainer needs from a task, and how a task describes its metrics.

A task is a data set, the model trained on it and how both are scored. It owns its config: a
dataclass of :func:`nograd.core.options.option` fields (the model's shape, the batch size, the
data path, ...), so ``nograd train --task NAME --help`` can list exactly that task's flags
while :class:`nograd.workbench.config.TrainConfig` keeps what every task shares.

To add a task, write a class that follows :class:`Task` and list it in
:data:`nograd.tasks.TASKS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn as nn

GOALS = ("min", "max")


@dataclass(frozen=True)
class Metric:
    """A named evaluation figure: which way is better, and levels worth drawing beside it.

    ``references`` maps a label to a level (for a char model's loss: the uniform, unigram, bigram
    and trigram losses), drawn as horizontal lines in ``loss.png``.
    """

    name: str
    goal: str  # "min" (lower is better) or "max"
    label: str = ""  # axis label, e.g. "loss (nats/char)"
    references: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.goal not in GOALS:
            raise ValueError(f"goal must be one of {GOALS}, got {self.goal!r}")

    def best(self, values: list[float]) -> float | None:
        """The best of the finite ``values`` by this metric's goal; None when there is none."""
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return None
        return min(finite) if self.goal == "min" else max(finite)


class BatchSource(Protocol):
    """Training batches; its state goes into checkpoints so a resumed run sees the same batches."""

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Task(Protocol):
    """A task as the trainer sees it.

    ``evaluate`` returns one value per entry of ``metrics``; the first metric is the one the
    trainer watches (a non-finite value stops the run) and summarises.
    """

    name: ClassVar[str]
    summary: ClassVar[str]  # one line, shown by `nograd tasks`
    Config: ClassVar[type]  # the dataclass of this task's options; its validate(), if any, runs
    # instead of nograd.core.options.check_options (call that first, then check across fields)
    metrics: tuple[Metric, ...]
    model_config: Any  # the dataclass the model is built from (stored in checkpoints)
    sampler: BatchSource
    meta: dict[str, Any]  # what a checkpoint needs to be used without the data (e.g. a vocabulary)

    def __init__(self, config: Any, seed: int) -> None: ...

    def build_model(self) -> nn.Module: ...

    def per_example_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of each row, shape (N,): forward-only methods split a batch between members."""
        ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``{metric name: value}`` on fixed held-out data, under ``torch.no_grad()``."""
        ...

    def sample(self, model: nn.Module, seed: int) -> str:
        """What the run shows at the end (generated text, predictions); "" for nothing."""
        ...
