"""Tasks: a data set, a model to train on it, and how to score it (see :mod:`nograd.tasks.base`).

``TASKS`` maps a task name to its class; ``get_task(name)`` looks one up with a clear error.
"""

from __future__ import annotations

from nograd.core.errors import UsageError
from nograd.tasks.base import Metric, Task
from nograd.tasks.prompt_classification import (
    PromptClassificationTask,
    TweetsBinaryTask,
    TweetsThreeClassTask,
)
from nograd.tasks.shakespeare import ShakespeareCharConfig, ShakespeareCharTask, per_example_loss

TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (ShakespeareCharTask, TweetsBinaryTask, TweetsThreeClassTask, PromptClassificationTask)
}


def get_task(name: str) -> type[Task]:
    """The task class registered as ``name``, or a UsageError listing the known ones."""
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    return TASKS[name]


__all__ = [
    "TASKS",
    "Metric",
    "ShakespeareCharConfig",
    "ShakespeareCharTask",
    "Task",
    "get_task",
    "per_example_loss",
]
