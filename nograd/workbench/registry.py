"""The optimizer registry and the protocol between the trainer and a method.

A *method* is anything that improves a model's weights from batches: a
gradient optimizer (AdamW, Muon), a zeroth-order estimator (MeZO), an
evolution strategy. The trainer knows methods only through this interface::

    build(model, loss_fn, cfg) -> Method
    method.step(x, y, lr_scale) -> StepResult
    method.state_dict() / method.load_state_dict(state)

``loss_fn(model, x, y)`` returns one loss per row of the batch (shape (N,)),
so forward-only methods can split a batch between population members. The trainer's
``loss_fn`` also has ``sample_targets(model, x, generator) -> y`` (targets drawn from the
model's own predictions, for SophiaG), None when the task cannot draw them.

To add a method, decorate its builder and list its module in
:data:`METHOD_MODULES` (imported lazily, so core modules never import the
trainer)::

    @register_method("mezo", "MeZO: SPSA with seeded in-place perturbations", forward_only=True,
                     default_lr=1e-4)
    def build_mezo(model, loss_fn, cfg):
        return MeZO(model, loss_fn, lr=cfg.lr, eps=cfg.eps or 1e-3, ...)

``cfg.lr`` is already resolved (``default_lr`` when the user gave none); the
other method-specific fields of :class:`nograd.workbench.config.TrainConfig`
(``population``, ``sigma``, ``rank``, ``eps``, ``directions``, ``outer``,
``weight_decay``) are ``None`` when the user left them to the method, and
``cfg.opts`` holds free-form ``--opt KEY=VALUE`` pairs: read them with
:func:`parse_opts` so an unknown key is an error, not silently ignored.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from nograd.core.errors import UsageError

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss_fn(model, x, y) -> Tensor (N,)``: the loss of each row of the batch."""


@dataclass
class StepResult:
    """What one optimizer step reports to the trainer."""

    loss: float  # training loss of this step (at the current weights, or the population mean)
    forward_tokens: (
        float  # forward-token-equivalents spent (a token through one forward = 1; backward counts 2)
    )
    info: dict[str, float] = field(default_factory=dict)  # anything else to log (nonfinite count, grad norm)


@runtime_checkable
class Method(Protocol):
    """An optimizer as the trainer sees it."""

    def step(self, x: torch.Tensor, y: torch.Tensor, lr_scale: float) -> StepResult:
        """Update the model once from batch (x, y); the lr is ``cfg.lr * lr_scale``."""
        ...

    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically (tensors and plain Python values only)."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


BuildFn = Callable[[nn.Module, LossFn, Any], Method]
"""``build(model, loss_fn, cfg) -> Method``, ``cfg`` a :class:`nograd.workbench.config.TrainConfig`
(typed ``Any`` here because the config module imports this one)."""

OUTER_OPTIMIZERS = ("adamw", "adam", "sgd", "muon")

COMPILED_METHODS = ("eggroll", "openai-es", "nres")
"""Methods whose batched population forward ``--compile`` runs through ``torch.compile``."""
"""Update rules an ES method can apply to its gradient estimate (``--outer``)."""


@dataclass(frozen=True)
class MethodInfo:
    """A registered method."""

    name: str
    summary: str  # one line, shown by `nograd optimizers`
    forward_only: bool  # True when the method never calls backward()
    build: BuildFn
    default_lr: float = 1e-3  # used when the user gives no --lr
    population: bool = False  # True when a step evaluates a population of perturbed models


METHODS: dict[str, MethodInfo] = {}
"""All registered methods by name. Call :func:`load_methods` first to fill it."""

METHOD_MODULES: list[str] = [
    "nograd.workbench.methods_grad",
    "nograd.workbench.methods_es",
    "nograd.workbench.methods_zo",
]
"""Modules that register methods when imported; add yours here."""


def register_method(
    name: str, summary: str, forward_only: bool, default_lr: float = 1e-3, population: bool = False
) -> Callable[[BuildFn], BuildFn]:
    """Decorator that registers ``build(model, loss_fn, cfg) -> Method`` under ``name``."""

    def decorator(build: BuildFn) -> BuildFn:
        if name in METHODS and METHODS[name].build is not build:
            raise ValueError(f"method {name!r} is already registered")
        METHODS[name] = MethodInfo(name, summary, forward_only, build, default_lr, population)
        return build

    return decorator


def load_methods() -> dict[str, MethodInfo]:
    """Import every module in :data:`METHOD_MODULES` and return the registry."""
    for module in METHOD_MODULES:
        importlib.import_module(module)
    return METHODS


def get_method(name: str) -> MethodInfo:
    """The registered method ``name``, or a UsageError listing the known ones."""
    methods = load_methods()
    if name not in methods:
        raise UsageError(f"unknown optimizer {name!r} (known: {', '.join(sorted(methods))})")
    return methods[name]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(key: str, value: str, default: Any, method: str) -> Any:
    try:
        if isinstance(default, bool):
            low = value.lower()
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        kind = type(default).__name__
        raise UsageError(f"--opt {key}={value}: expected a {kind} for {method}") from None
    return value


def parse_opts(opts: Mapping[str, str], defaults: Mapping[str, Any], method: str) -> dict[str, Any]:
    """Merge ``--opt KEY=VALUE`` strings into ``defaults``, converting to each default's type.

    A default of None takes the value as a string. Unknown keys are a
    UsageError naming the keys ``method`` accepts.
    """
    unknown = sorted(set(opts) - set(defaults))
    if unknown:
        known = ", ".join(sorted(defaults)) or "none"
        raise UsageError(f"unknown --opt key {unknown[0]!r} for {method} (known: {known})")
    out = dict(defaults)
    for key, value in opts.items():
        out[key] = _convert(key, value, defaults[key], method)
    return out
