"""Tasks: a data set, a model to train on it, and how to score it.

``TASKS`` maps a task name to a builder ``build(cfg: TrainConfig) -> Task``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn

from nograd.data import BatchSampler
from nograd.errors import UsageError
from nograd.tasks.shakespeare import ShakespeareCharTask, per_example_loss

if TYPE_CHECKING:
    from nograd.train import TrainConfig


class Task(Protocol):
    """What the trainer uses from a task."""

    name: str
    model_config: Any  # the dataclass the model is built from (stored in checkpoints)
    sampler: BatchSampler  # training batches; its state goes into checkpoints
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]  # fixed, for comparable val loss
    meta: dict[str, Any]  # what sampling needs without the data (e.g. the vocabulary)

    def build_model(self) -> nn.Module: ...

    def per_example_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of each row, shape (N,)."""
        ...

    def evaluate(self, model: nn.Module) -> float:
        """Validation loss on the fixed validation batches, under torch.no_grad()."""
        ...

    def sample(self, model: nn.Module, prompt: str | None = None, chars: int = 300, seed: int = 0) -> str: ...


TASKS: dict[str, Callable[[TrainConfig], Task]] = {
    "shakespeare-char": ShakespeareCharTask,
}


def build_task(cfg: TrainConfig) -> Task:
    """The task named by ``cfg.task``, or a UsageError listing the known ones."""
    if cfg.task not in TASKS:
        raise UsageError(f"unknown task {cfg.task!r} (known: {', '.join(sorted(TASKS))})")
    return TASKS[cfg.task](cfg)


__all__ = ["TASKS", "Task", "build_task", "per_example_loss", "ShakespeareCharTask"]
