"""The workbench: the training loop, its config, the method registry and checkpoints.

What may use what: this layer imports the core, the algorithms (``zo``, ``strategies``,
``optim``), the models and the tasks; nothing below imports it.

Example:
    >>> from nograd.workbench import make_config
    >>> make_config(optimizer="mezo", n_layer=1).task_config.n_layer
    1
"""

from nograd.workbench.config import TrainConfig, lr_scale, make_config, resume_config
from nograd.workbench.loop import Run, train
from nograd.workbench.registry import (
    METHODS,
    Method,
    MethodInfo,
    StepResult,
    get_method,
    load_methods,
    parse_opts,
    register_method,
)

__all__ = [
    "METHODS",
    "Method",
    "MethodInfo",
    "Run",
    "StepResult",
    "TrainConfig",
    "get_method",
    "load_methods",
    "lr_scale",
    "make_config",
    "parse_opts",
    "register_method",
    "resume_config",
    "train",
]
