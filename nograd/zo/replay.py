"""Rebuild a zeroth-order run's weights from its initial weights and its trajectory log.

A zeroth-order step is fully described by a few numbers: its seed and step (which regenerate
the noise), the directions kept, their projected gradients, and the hyperparameters in force.
Every optimizer of :mod:`nograd.zo` can append these to a JSONL log (``log_path=``); replaying
the log re-applies exactly the same update code with no forward pass, so in float32 on the same
device the replayed weights equal the trained ones bit for bit. Optimizer state (momentum, Adam
moments, HiZOO's Hessian) is recomputed along the way.

Log format (one JSON object per line)::

    {"format": "nograd-zo-trajectory", "version": 1, "optimizer": "MeZO",
     "kwargs": {"seed": 0, "distribution": "gaussian", "noise_rank": 0, "directions": 2, ...},
     "names": ["0.weight", ...] or null, "shapes": [[4, 3], ...], "group_of": [0, 0, ...]}
    {"step": 0, "seed": 0, "directions": [0, 1], "proj_grads": [[g00, g01]],
     "groups": [{"lr": 1e-3, "eps": 1e-3, "weight_decay": 0.0}], "loss": 2.3, "nonfinite": 0,
     "forwards": 4}
    {"step": 1, "seed": 0, "skipped": true}          # every direction was NaN/inf
    ...

``proj_grads[j][k]`` is direction ``k``'s projected gradient in param group ``j``
(``(L+ - L-) / (2 eps_j)``; the jvp value for forward gradients); HiZOO records add
``"curvature": [L+ + L- - 2 L0, ...]``. A run resumed from a checkpoint appends to the same
log; records whose step goes backwards supersede the earlier ones from that step on.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import UsageError
from .base import TRAJECTORY_FORMAT, Record, ZOOptimizer


def optimizer_classes() -> dict[str, type[ZOOptimizer]]:
    """Optimizer name (as in a log header) -> class."""
    from .adam import ZOAdam
    from .forward_grad import ForwardGradient
    from .hizoo import HiZOO
    from .mezo import MeZO
    from .momentum import ZOMomentum
    from .sign import ZOSign

    return {c.__name__: c for c in (MeZO, ZOSign, ZOMomentum, ZOAdam, HiZOO, ForwardGradient)}


def read_trajectory(log: str | os.PathLike | Iterable[Record | str]) -> tuple[Record | None, list[Record]]:
    """(header or None, records in order) from a JSONL file or an iterable of dicts/lines.

    When the steps of a resumed run go backwards, the later records replace the earlier ones
    from that step on. Raises ValueError for a gap in the steps or an unreadable line.
    """
    if isinstance(log, (str, os.PathLike)):
        path = Path(log)
        if not path.is_file():
            raise UsageError(f"trajectory log {str(path)!r} does not exist")
        with open(path) as f:
            lines: Iterable[Any] = [line for line in f if line.strip()]
    else:
        lines = log
    header: Record | None = None
    records: list[Record] = []
    for n, item in enumerate(lines, 1):
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except json.JSONDecodeError as e:
                raise ValueError(f"trajectory line {n} is not JSON ({e.msg})") from None
        if not isinstance(item, Mapping):
            raise ValueError(f"trajectory line {n} is not a JSON object")
        if item.get("format") == TRAJECTORY_FORMAT:
            if header is None:
                header = dict(item)
            continue
        if "step" not in item:
            raise ValueError(f"trajectory line {n} has no 'step'")
        step = int(item["step"])
        while records and int(records[-1]["step"]) >= step:
            records.pop()
        if records and step != int(records[-1]["step"]) + 1:
            raise ValueError(f"trajectory jumps from step {records[-1]['step']} to {step} (line {n})")
        records.append(dict(item))
    return header, records


def _tensors_for(model_or_params: Any, header: Record | None) -> tuple[list[torch.Tensor], nn.Module | None]:
    if isinstance(model_or_params, nn.Module):
        module = model_or_params
        named = dict(module.named_parameters())
        names = header.get("names") if header else None
        if names:
            missing = [n for n in names if n not in named]
            if missing:
                raise ValueError(f"the model has no parameter {missing[0]!r} that the log trained")
            tensors = [named[n] for n in names]
        else:
            tensors = [p for p in module.parameters() if p.requires_grad]
        return tensors, module
    if isinstance(model_or_params, Mapping):
        raise TypeError(
            "pass a module or a list of tensors "
            "(nograd.workbench.replay.replay_command takes a state dict file)"
        )
    return list(model_or_params), None


def replay(
    model_or_params: nn.Module | Iterable[torch.Tensor],
    log: str | os.PathLike | Iterable[Record | str],
    optimizer_kwargs: Mapping[str, Any] | None = None,
    *,
    optimizer: str | type[ZOOptimizer] | None = None,
) -> ZOOptimizer:
    """Apply every step of ``log`` to ``model_or_params`` in place, with no forward pass.

    ``model_or_params`` must hold the weights from before the log's first step (its initial
    state for a stateful optimizer, whose state is rebuilt from step 0). ``log`` is a JSONL path
    or the records themselves (e.g. collected with ``trajectory=records.append``).
    ``optimizer_kwargs`` override the constructor arguments in the log header; ``optimizer``
    (class or name) is needed only when the log has no header. Returns the optimizer, whose
    state and step counter are those after the last step, so training can go on from it.

    Example:
        >>> import torch, nograd
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> init = {k: v.clone() for k, v in model.state_dict().items()}
        >>> records = []
        >>> opt = nograd.MeZO(model, lr=1e-2, trajectory=records.append)
        >>> x = torch.randn(16, 3)
        >>> for _ in range(5):
        ...     _ = opt.step(lambda: model(x).pow(2).mean())
        >>> copy = torch.nn.Linear(3, 1); copy.load_state_dict(init)
        <All keys matched successfully>
        >>> _ = nograd.zo.replay(copy, [opt.trajectory_header()] + records)
        >>> all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters()))
        True
    """
    header, records = read_trajectory(log)
    classes = optimizer_classes()
    if optimizer is None:
        if header is None:
            raise ValueError("the log has no header line: pass optimizer= (a class or its name)")
        optimizer = header["optimizer"]
    if isinstance(optimizer, str):
        if optimizer not in classes:
            raise ValueError(f"unknown optimizer {optimizer!r} in the log (known: {', '.join(classes)})")
        cls = classes[optimizer]
    else:
        cls = optimizer
    accepted = _init_args(cls)
    kwargs = {k: v for k, v in (header.get("kwargs", {}) if header else {}).items() if k in accepted}
    kwargs.update(optimizer_kwargs or {})
    tensors, module = _tensors_for(model_or_params, header)
    frozen = [i for i, t in enumerate(tensors) if not t.requires_grad]
    if frozen:
        raise ValueError(f"tensor {frozen[0]} of the log is frozen (requires_grad=False) here")
    if header and header.get("shapes") is not None:
        shapes = [list(t.shape) for t in tensors]
        if shapes != header["shapes"]:
            raise ValueError(f"the tensors' shapes {shapes} differ from the log's {header['shapes']}")
    group_of = header.get("group_of") if header else None
    if not group_of:
        group_of = [0] * len(tensors)
    if len(group_of) != len(tensors):
        raise ValueError(f"the log trained {len(group_of)} tensors, {len(tensors)} were given")
    n_groups = max(group_of) + 1
    first = next((r for r in records if not r.get("skipped")), None)
    groups: list[dict[str, Any]] = []
    for j in range(n_groups):
        hyper = dict(first["groups"][j]) if first else {}
        hyper = {
            k: (tuple(v) if isinstance(v, list) else v) for k, v in hyper.items() if k in _group_keys(cls)
        }
        groups.append({"params": [t for t, g in zip(tensors, group_of) if g == j], **hyper})
    opt = cls(groups, **kwargs)
    if module is not None and hasattr(opt, "module") and opt.module is None:
        opt.module = module
    if records:
        opt._zo_step = int(records[0]["step"])
        if records[0]["step"] != 0 and _stateful(opt):
            raise ValueError(
                f"the log starts at step {records[0]['step']}; {cls.__name__} keeps state, "
                "so replay needs the log from step 0"
            )
    with torch.no_grad():
        for record in records:
            opt.replay_step(record)
    return opt


def _init_args(cls: type[ZOOptimizer]) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "params"}


def _group_keys(cls: type[ZOOptimizer]) -> set[str]:
    return _init_args(cls) | {"lr", "eps", "weight_decay"}


def _stateful(opt: ZOOptimizer) -> bool:
    from .adam import ZOAdam
    from .hizoo import HiZOO
    from .momentum import ZOMomentum

    return isinstance(opt, (ZOAdam, HiZOO, ZOMomentum))
