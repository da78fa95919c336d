"""Shared machinery of the zeroth-order optimizers: estimate -> record -> update rule.

Every optimizer in :mod:`nograd.zo` is an *estimator* (seeded noise and forward passes in, a
handful of scalars out, see :mod:`nograd.zo.estimators`) composed with an *update rule* (those
scalars and the regenerated noise in, new weights out), in the spirit of optax. One step is::

    evaluation = estimator.evaluate(closure, generation)   # the only forward passes
    record = optimizer.make_record(evaluation)             # plain JSON: seeds, scalars, lrs
    optimizer.apply_record(record)                         # the update rule; no forward pass

Because the update reads nothing but the record, the optimizer's state and the noise, the same
:meth:`ZOOptimizer.apply_record` rebuilds a run from its trajectory log bit-exactly
(:func:`nograd.zo.replay`).

The projected gradient of direction ``k`` in parameter group ``j`` is
``g_jk = (L(theta + Delta_k) - L(theta - Delta_k)) / (2 eps_j)`` (two-sided) or
``(L(theta + Delta_k) - L(theta)) / eps_j`` (one-sided), where ``Delta_k`` moves group ``j`` by
``eps_j z_k``. The estimate is ``g_hat = (1/n) sum_k g_jk z_k`` over the ``n`` directions whose
losses were finite.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.distributed import Collective
from ..core.engine import ParamSpace, accumulate
from ..core.noise import DISTRIBUTIONS, SeededNoise
from ..core.rounding import add_rounded_, round_key, scale_rounded_
from ..core.shaping import NonFiniteFitnessError

TRAJECTORY_FORMAT = "nograd-zo-trajectory"
TRAJECTORY_VERSION = 1

Closure = Callable[[], Any]
Record = dict[str, Any]


# ------------------------------------------------------------------------------------ helpers


def check_positive(name: str, value: float, *, strict: bool = True) -> None:
    """Raise ValueError unless ``value`` is a finite number > 0 (``>= 0`` when not strict)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    ok = math.isfinite(value) and (value > 0 if strict else value >= 0)
    if not ok:
        raise ValueError(f"{name} must be {'> 0' if strict else '>= 0'}, got {value!r}")


def check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_common(noise_rank: int, distribution: str, seed: int) -> None:
    check_int("noise_rank", noise_rank, 0)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def to_float(value: Any) -> float:
    """A closure's value as a Python float (a number or a one-element tensor)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"the closure must return a scalar loss, got a tensor of shape {tuple(value.shape)}"
            )
        return float(value.detach().reshape(()).item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"the closure must return a float or a 0-dim tensor, got {type(value).__name__}"
        ) from None


def dense_estimate(
    space: ParamSpace, noise: SeededNoise, i: int, generation: int, coefficients: Sequence[tuple[int, float]]
) -> torch.Tensor:
    """``sum_k c_k E_k`` for tensor ``i`` alone, in float32 (one tensor-sized buffer)."""
    p = space.tensors[i]
    if space.lowrank[i] and len(coefficients) > 1:
        pairs = [space.factors(noise, i, generation, d) for d, _ in coefficients]
        a = torch.cat([pa * c for (pa, _), (_, c) in zip(pairs, coefficients)], dim=1)
        b = torch.cat([pb for _, pb in pairs], dim=1)
        return (a @ b.T).div_(math.sqrt(space.rank)).view(p.shape)
    g = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    for d, c in coefficients:
        space.add_direction_(noise, i, generation, d, c, g)
    return g


def add_estimate_(
    space: ParamSpace,
    noise: SeededNoise,
    i: int,
    generation: int,
    coefficients: Sequence[tuple[int, float]],
    alpha: float,
    target: torch.Tensor,
    kind: int = 0,
) -> None:
    """``target += alpha * sum_k c_k E_k`` for tensor ``i``.

    A float32 target gets the noise added block by block (no buffer); other dtypes accumulate the
    sum in one float32 buffer of the tensor's size so the weight is rounded once (stochastically
    for bfloat16 / float16, keyed by ``generation``, ``i`` and ``kind``).
    """
    if target.dtype == torch.float32 and not (space.lowrank[i] and len(coefficients) > 1):
        for d, c in coefficients:
            space.add_direction_(noise, i, generation, d, alpha * c, target)
        return
    g = dense_estimate(space, noise, i, generation, coefficients)
    add_rounded_(target, g, round_key(noise.seed, generation, i, kind), alpha=alpha)


class ScaledView:
    """A :class:`ParamSpace` seen by :class:`~nograd.core.engine.InPlacePerturbation` with per-tensor scales.

    Tensor ``i`` moves by ``alpha * scales[i] * E`` (per-group ``eps``), or by
    ``alpha * scales[i] * E / sqrt(hessian[i])`` when a diagonal Hessian estimate is set (HiZOO's
    ``Sigma^{1/2} u`` with ``Sigma = diag(hessian)^{-1}``). Everything else is the wrapped space.
    """

    def __init__(self, space: ParamSpace) -> None:
        self.space = space
        self.tensors = space.tensors
        self.index_of = space.index_of
        self.module = space.module
        self.scales: list[float] = [1.0] * len(space)
        self.hessian: Sequence[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.space)

    def streamable(self, i: int) -> bool:
        return self.space.streamable(i)

    def direction_rows(
        self, noise: SeededNoise, i: int, generation: int, direction: int, alpha: float
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The wrapped space's rows, scaled as :meth:`add_direction_` scales the whole tensor."""
        for r0, block in self.space.direction_rows(noise, i, generation, direction, alpha * self.scales[i]):
            if self.hessian is not None:
                block.div_(self.hessian[i][r0 : r0 + block.shape[0]].sqrt())
            yield r0, block

    def add_direction_(
        self, noise: SeededNoise, i: int, generation: int, direction: int, alpha: float, target: torch.Tensor
    ) -> None:
        a = alpha * self.scales[i]
        if self.hessian is None:
            self.space.add_direction_(noise, i, generation, direction, a, target)
            return
        e = self.space.dense(noise, i, generation, direction)
        e.div_(self.hessian[i].sqrt())
        target.add_(e.to(target.dtype), alpha=a)


@dataclass
class Evaluation:
    """What the forward passes of one step produced (the estimator's output).

    ``diffs[k]`` is the loss difference along direction ``directions[k]``: ``(L+ - L-)/2``
    two-sided, ``L+ - L0`` one-sided, or the directional derivative for forward gradients.
    Only directions whose losses were all finite are listed.
    """

    directions: list[int]
    diffs: list[float]
    loss: float
    nonfinite: int
    forwards: int
    center: float | None = None  # L(theta) when it was evaluated
    curvature: list[float] | None = None  # L+ + L- - 2 L0 per direction (HiZOO)


def jsonable(value: Any) -> Any:
    """Tuples become lists, so a record is the same before and after a JSON round trip."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def _plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return False


# --------------------------------------------------------------------------------- optimizer


class ZOOptimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` whose ``step(closure)`` uses forward passes only.

    Subclasses define :meth:`evaluate` (usually the shared SPSA estimator) and
    :meth:`apply_record` (the update rule). ``params`` may be ``model.parameters()``,
    ``model.named_parameters()``, param-group dicts, or an ``nn.Module`` (its trainable
    parameters, with names, so a trajectory log can be replayed onto a checkpoint).

    Per-step information is in ``opt.last_info``; each applied step can be appended to a JSONL
    trajectory log (``log_path``) and/or passed to ``trajectory(record)``.
    """

    #: group hyperparameters that must be finite and >= 0 (> 0 for the strict ones)
    _nonneg: ClassVar[tuple[str, ...]] = ("lr", "weight_decay")
    _strict: ClassVar[tuple[str, ...]] = ("eps",)

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict],
        defaults: dict[str, Any],
        *,
        noise_rank: int = 0,
        distribution: str = "gaussian",
        seed: int = 0,
        log_path: str | os.PathLike | None = None,
        trajectory: Callable[[Record], None] | None = None,
        header_kwargs: dict[str, Any] | None = None,
        process_group: Any = None,
    ) -> None:
        check_common(noise_rank, distribution, seed)
        self.module = params if isinstance(params, nn.Module) else None
        if self.module is not None:
            params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
            if not params:
                raise ValueError("the module has no parameters with requires_grad=True to optimise")
        super().__init__(params, defaults)
        tensors = [p for g in self.param_groups for p in g["params"]]
        self.space = ParamSpace(tensors, rank=noise_rank)
        self.group_of: list[int] = [0] * len(self.space)
        names: list[str | None] = [None] * len(self.space)
        for j, group in enumerate(self.param_groups):
            group_names = group.get("param_names")
            for k, p in enumerate(group["params"]):
                i = self.space.index_of.get(id(p))
                if i is not None:
                    self.group_of[i] = j
                    names[i] = group_names[k] if group_names else None
        self.param_names: list[str] | None = names if all(n is not None for n in names) else None  # type: ignore[assignment]
        self.seed = int(seed)
        self.distribution = distribution
        self.noise_rank = int(noise_rank)
        self.noise = SeededNoise(self.seed, distribution)
        self.log_path = log_path
        self.trajectory = trajectory
        self.last_info: dict[str, float] = {}
        self.estimator: Any = None  # set by subclasses; shares self.noise (see sync_noise)
        self.collective = Collective(process_group)  # the ranks sharing each step's directions
        self._zo_step = 0
        self._header_kwargs = {
            "seed": self.seed,
            "distribution": distribution,
            "noise_rank": self.noise_rank,
            **(header_kwargs or {}),
        }

    # -- validation --------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "space", None) is not None:
            raise RuntimeError(
                "zeroth-order optimizers cannot take new param groups after construction "
                "(the noise is keyed by each tensor's position)"
            )
        super().add_param_group(param_group)
        self.validate_group(self.param_groups[-1])

    def validate_group(self, group: dict[str, Any]) -> None:
        """Raise ValueError for a bad hyperparameter of one param group."""
        for key in self._nonneg:
            if key in group:
                check_positive(key, group[key], strict=False)
        for key in self._strict:
            if key in group:
                check_positive(key, group[key])

    # -- the step ----------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """The next step's number, which is also its noise generation."""
        return self._zo_step

    def evaluate(self, closure: Closure, generation: int) -> Evaluation:  # pragma: no cover
        raise NotImplementedError

    def apply_record(self, record: Record) -> None:  # pragma: no cover
        """The update rule: change the weights (and state) from ``record`` and the noise only."""
        raise NotImplementedError

    def extra_record(self, evaluation: Evaluation) -> Record:
        """Method-specific fields of the record (HiZOO adds the curvature terms)."""
        return {}

    def group_hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        skip = {"params", "param_names"}
        return {k: jsonable(v) for k, v in group.items() if k not in skip and _plain(v)}

    def proj_grads(self, evaluation: Evaluation) -> list[list[float]]:
        """Projected gradients per group and direction: ``diff_k / eps_j``."""
        return [[d / g["eps"] for d in evaluation.diffs] for g in self.param_groups]

    def make_record(self, evaluation: Evaluation, generation: int) -> Record:
        for g in self.param_groups:  # groups may have been edited since construction
            self.validate_group(g)
        record: Record = {
            "step": generation,
            "seed": self.seed,
            "directions": list(evaluation.directions),
            "proj_grads": self.proj_grads(evaluation),
            "groups": [self.group_hyper(g) for g in self.param_groups],
            "loss": evaluation.loss,
            "nonfinite": evaluation.nonfinite,
            "forwards": evaluation.forwards,
        }
        record.update(self.extra_record(evaluation))
        return record

    def coefficients(self, record: Record, j: int) -> list[tuple[int, float]]:
        """``(direction, g_jk / n)`` pairs: the estimate of group ``j`` is ``sum_k c_k z_k``."""
        dirs = record["directions"]
        n = len(dirs)
        return [(d, g / n) for d, g in zip(dirs, record["proj_grads"][j])]

    def step(self, closure: Closure | None = None) -> float:  # type: ignore[override]
        """Estimate the gradient from forward passes of ``closure`` and update; returns the loss.

        ``closure()`` returns the loss as a float or a one-element tensor and must not call
        ``backward()``; it may be non-differentiable. It runs under ``torch.no_grad()``.
        If every direction's loss is NaN/inf, :class:`~nograd.core.shaping.NonFiniteFitnessError`
        is raised with the weights and optimizer state untouched; the step counter still
        advances, so a retry draws new noise.
        """
        if closure is None or not callable(closure):
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        generation = self._zo_step
        try:
            evaluation = self.evaluate(closure, generation)
        except NonFiniteFitnessError as e:
            self._zo_step += 1
            self.last_info = {
                "nonfinite": float(getattr(e, "nonfinite", 0)),
                "forwards": float(getattr(e, "forwards", 0)),
                "skipped": 1.0,
            }
            self._emit({"step": generation, "seed": self.seed, "skipped": True})
            raise
        record = self.make_record(evaluation, generation)
        self.apply_record(record)
        self._zo_step = generation + 1
        self.last_info = {
            "loss": evaluation.loss,
            "nonfinite": float(evaluation.nonfinite),
            "forwards": float(evaluation.forwards),
            "directions": float(len(evaluation.directions)),
        }
        self._emit(record)
        return evaluation.loss

    def replay_step(self, record: Record) -> None:
        """Apply one logged step without any forward pass (used by :func:`nograd.zo.replay`)."""
        if record.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"record of step {record.get('step')} has seed {record['seed']}, not {self.seed}"
            )
        if not record.get("skipped"):
            if len(record["groups"]) != len(self.param_groups):
                raise ValueError(
                    f"record of step {record['step']} has {len(record['groups'])} param groups, "
                    f"the optimizer {len(self.param_groups)}"
                )
            for group, hyper in zip(self.param_groups, record["groups"]):
                for k, v in hyper.items():
                    group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
            self.apply_record(record)
        self._zo_step = int(record["step"]) + 1

    # -- trajectory log ----------------------------------------------------------------------
    def trajectory_header(self) -> Record:
        """The first line of a trajectory log: what :func:`nograd.zo.replay` needs besides records."""
        return {
            "format": TRAJECTORY_FORMAT,
            "version": TRAJECTORY_VERSION,
            "optimizer": type(self).__name__,
            "kwargs": jsonable(self._header_kwargs),
            "names": self.param_names,
            "shapes": [list(p.shape) for p in self.space.tensors],
            "group_of": list(self.group_of),
        }

    def _emit(self, record: Record) -> None:
        if self.trajectory is not None:
            self.trajectory(record)
        if self.log_path is not None:
            path = Path(self.log_path)
            new = not path.exists() or path.stat().st_size == 0
            with open(path, "a") as f:
                if new:
                    f.write(json.dumps(self.trajectory_header()) + "\n")
                f.write(json.dumps(record) + "\n")

    # -- state -------------------------------------------------------------------------------
    def zo_state(self) -> dict[str, Any]:
        """Global (not per-tensor) state; subclasses extend it."""
        return {
            "step": self._zo_step,
            "seed": self.seed,
            "distribution": self.distribution,
            "noise_rank": self.noise_rank,
        }

    def load_zo_state(self, state: dict[str, Any]) -> None:
        if int(state.get("noise_rank", self.noise_rank)) != self.noise_rank:
            raise ValueError(
                f"state was saved with noise_rank={state['noise_rank']}, this optimizer has {self.noise_rank}"
            )
        self._zo_step = int(state["step"])
        self.seed = int(state["seed"])
        self.distribution = str(state.get("distribution", self.distribution))
        self.noise = SeededNoise(self.seed, self.distribution)
        self._header_kwargs.update(seed=self.seed, distribution=self.distribution)
        self.sync_noise()

    def sync_noise(self) -> None:
        """Make the estimator draw the optimizer's noise and share its ranks (after construction or a
        state load)."""
        if self.estimator is not None:
            self.estimator.use_noise(self.noise)
            self.estimator.collective = self.collective

    def group_eps(self) -> list[float]:
        """The perturbation size of each tensor (its group's ``eps``)."""
        return [float(self.param_groups[j]["eps"]) for j in self.group_of]

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["zo"] = self.zo_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError("not a zeroth-order optimizer state (no 'zo' entry)")
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype; ours is kept in float32
        for st in self.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float32:
                    st[k] = v.float()
        self.load_zo_state(zo)
        self._after_load()

    def _after_load(self) -> None:
        """Hook for subclasses whose estimator keeps references into ``self.state``."""

    # -- shared update pieces ----------------------------------------------------------------
    def decay_(self, i: int, lr: float, weight_decay: float, generation: int) -> None:
        """``p -= lr * wd * p`` for tensors with >= 2 dims (biases and norm weights are skipped)."""
        p = self.space.tensors[i]
        if weight_decay and p.dim() >= 2:
            scale_rounded_(p, 1.0 - lr * weight_decay, round_key(self.noise.seed, generation, i, 1))

    def add_to_weight_(self, i: int, delta: torch.Tensor, alpha: float, generation: int) -> None:
        """``p_i += alpha * delta`` (float32 ``delta``), rounded stochastically for bfloat16 / float16."""
        p = self.space.tensors[i]
        add_rounded_(p, delta, round_key(self.noise.seed, generation, i), alpha=alpha)


class SGDRule:
    """Mixin: ``theta <- theta - lr (g_hat + wd theta)`` with no model-sized buffer.

    With one param group the update goes through :func:`nograd.core.engine.accumulate`; with several
    (each its own lr and coefficients) the same block-wise addition runs tensor by tensor.
    """

    def apply_record(self: Any, record: Record) -> None:
        generation = int(record["step"])
        groups = record["groups"]
        with torch.no_grad():
            for i in range(len(self.space)):
                h = groups[self.group_of[i]]
                self.decay_(i, h["lr"], h.get("weight_decay", 0.0), generation)
            if len(groups) == 1:
                accumulate(
                    self.space,
                    self.noise,
                    generation,
                    self.coefficients(record, 0),
                    lr=groups[0]["lr"],
                    into="update",
                )
                return
            coeffs = [self.coefficients(record, j) for j in range(len(groups))]
            for i, p in enumerate(self.space.tensors):
                j = self.group_of[i]
                add_estimate_(self.space, self.noise, i, generation, coeffs[j], -groups[j]["lr"], p.data)
