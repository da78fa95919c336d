"""Documented, checked config fields: one declaration gives the default, the help, the bounds.

A config is a dataclass whose fields are declared with :func:`option`. The same declaration
serves three readers: the library user (defaults and a docstring-like help), the command line
(``nograd train`` builds one flag per field, ``--n-layer`` for ``n_layer``) and
:func:`check_options`, which refuses a bad value with a one-line :class:`UsageError` that names
the flag. Checks come by class, not case by case: every number must be finite and fit the
dtype it ends up in (float32 for floats, int64 for integers), then lie within its bounds.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Model:
    ...     width: int = option(64, "hidden units", min=1)
    ...     lr: float = option(1e-3, "learning rate", above=0)
    >>> check_options(Model(width=0))
    Traceback (most recent call last):
    ...
    nograd.core.errors.UsageError: --width must be >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from typing import Any

from nograd.core.errors import UsageError

FLOAT32_MAX = 3.4028234663852886e38  # floats reach the weights as float32
INT64_MAX = 2**63 - 1

RESUME_POLICIES = ("saved", "new", "new-or-saved", "given")
"""What a resumed run does with a field: ``saved`` keeps the checkpoint's (giving another value
is an error), ``new`` takes the resumed run's, ``new-or-saved`` takes the resumed run's unless it
is None, ``given`` keeps the checkpoint's unless the user gives one."""


def option(
    default: Any,
    help: str,
    *,
    min: float | None = None,
    above: float | None = None,
    max: float | None = None,
    below: float | None = None,
    choices: Sequence[Any] | None = None,
    resume: str = "saved",
    cli: bool = True,
    metavar: str | None = None,
) -> Any:
    """A dataclass field with its help text, bounds and resume policy.

    ``min``/``max`` are inclusive bounds, ``above``/``below`` exclusive; ``choices`` lists the
    allowed values; ``cli=False`` keeps the field off the generated command line (it has a flag
    of its own). A ``list`` or ``dict`` default is copied for each instance.
    """
    if resume not in RESUME_POLICIES:
        raise ValueError(f"resume must be one of {RESUME_POLICIES}, got {resume!r}")
    meta = {
        "help": help,
        "min": min,
        "above": above,
        "max": max,
        "below": below,
        "choices": tuple(choices) if choices is not None else None,
        "resume": resume,
        "cli": cli,
        "metavar": metavar,
    }
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """``n_layer`` -> ``--n-layer``."""
    return "--" + name.replace("_", "-")


def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """``{field: (base type, None allowed)}`` for a dataclass (``int | None`` -> ``(int, True)``)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        optional = False
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
            args = typing.get_args(hint)
            optional = type(None) in args
            hint = next(a for a in args if a is not type(None))
        out[f.name] = (typing.get_origin(hint) or hint, optional)
    return out


def _bound_error(flag: str, value: Any, meta: dict[str, Any]) -> str | None:
    if meta["min"] is not None and not value >= meta["min"]:
        return f"{flag} must be >= {meta['min']}, got {value}"
    if meta["above"] is not None and not value > meta["above"]:
        return f"{flag} must be > {meta['above']}, got {value}"
    if meta["max"] is not None and not value <= meta["max"]:
        return f"{flag} must be <= {meta['max']}, got {value}"
    if meta["below"] is not None and not value < meta["below"]:
        return f"{flag} must be < {meta['below']}, got {value}"
    return None


def check_value(name: str, value: Any, base: type, optional: bool, meta: dict[str, Any]) -> None:
    """Raise UsageError naming ``--name`` when ``value`` is not a valid ``base`` within bounds."""
    flag = flag_name(name)
    if value is None:
        if not optional:
            raise UsageError(f"{flag} is required")
        return
    if base is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{flag} must be true or false, got {value!r}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{flag} must be a whole number, got {value!r}")
        if abs(value) > INT64_MAX:
            raise UsageError(f"{flag} {value} does not fit in a 64-bit integer")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{flag} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
        if abs(value) > FLOAT32_MAX:
            raise UsageError(f"{flag} {value} is too large for float32 (the largest is about 3.4e38)")
    elif base is str:
        if not isinstance(value, str):
            raise UsageError(f"{flag} must be a string, got {value!r}")
    if base in (int, float):
        problem = _bound_error(flag, value, meta)
        if problem:
            raise UsageError(problem)
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise UsageError(f"{flag} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")


DEVICE_KINDS = ("cpu", "cuda", "mps")


def check_device(device: str, flag: str = "--device") -> None:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and present on this machine; else a UsageError."""
    import torch

    kind, _, index = device.partition(":")
    if kind not in DEVICE_KINDS or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise UsageError(f"unknown {flag} {device!r} (cpu, cuda, cuda:N or mps)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device} given but CUDA is not available")
        if index and int(index) >= torch.cuda.device_count():
            raise UsageError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} mps given but MPS is not available")


def check_options(config: Any) -> None:
    """Check every :func:`option` field of the dataclass instance ``config`` (see module doc)."""
    types = field_types(type(config))
    for f in dataclasses.fields(config):
        if "help" not in f.metadata:
            continue
        base, optional = types[f.name]
        check_value(f.name, getattr(config, f.name), base, optional, dict(f.metadata))
