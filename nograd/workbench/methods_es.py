"""Evolution strategies as trainer methods (``nograd train --optimizer NAME``).

Registered names and what they run (``forward_tokens = population x B x T`` per step for all):

* ``eggroll``   - :class:`~nograd.strategies.eggroll.EGGROLL` (Sarkar et al. 2025): rank-r
  antithetic perturbations in one batched forward, z-scored fitness, estimate into ``.grad``
  of an outer optimizer (AdamW without decay by default).
* ``openai-es`` - :class:`~nograd.strategies.openai_es.OpenAIES` (Salimans et al. 2017): dense
  antithetic noise, centered ranks, same outer optimizer.
* ``sep-cma``, ``lm-ma-es``, ``rm-es``, ``snes``, ``pgpe``, ``cem``, ``cma``, ``ga`` - a flat
  ask/tell strategy on all trainable weights through
  :class:`~nograd.strategies.module_adapter.ModuleAdapter` (the population in one batched forward
  over the members' own weights while it fits in memory, else one by one on CPU and vmapped
  chunks on CUDA; ``--opt mode=batched|vmap|loop``). These
  adapt their own step sizes: ``--lr`` and its schedule are not used. Full ``cma`` only fits tiny
  models (dim <= 2000).
* ``nres`` - :class:`~nograd.strategies.nres.NRES` (Li et al. 2023). The GPT has no recurrent
  state, so on a text stream NRES means: each antithetic worker keeps its noise for ``reuse``
  consecutive steps (one window = one batch), workers renew it at staggered steps, and the update
  is the raw antithetic difference ``eps (L+ - L-) / (2 sigma)`` (no fitness shaping).

Options: ``--population``, ``--sigma``, ``--rank``, ``--outer`` (``adamw``, ``adam``, ``sgd``,
``muon``), ``--lr``, ``--weight-decay`` come from the config; the rest from ``--opt KEY=VALUE``
(each method's keys are listed by an unknown-key error and in :data:`ES_OPTS`). ``eggroll`` and
``openai-es`` also take how the directions are drawn
(:class:`~nograd.strategies.module_es.DirectionSampling`): ``orthogonal=true``,
``guided=FRACTION`` with ``guide_history=K``, ``sigma_lr=ETA`` (per-tensor noise scales).

Example:
    >>> from nograd.workbench.registry import load_methods
    >>> sorted(n for n in load_methods() if n in ES_METHODS)  # doctest: +NORMALIZE_WHITESPACE
    ['cem', 'cma', 'eggroll', 'ga', 'lm-ma-es', 'nres', 'openai-es', 'pgpe', 'rm-es', 'sep-cma', 'snes']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from nograd.core.distributed import default_group
from nograd.core.errors import UsageError
from nograd.optim import adamw, muon_and_adamw
from nograd.strategies.eggroll import EGGROLL
from nograd.strategies.module_adapter import ModuleAdapter
from nograd.strategies.module_es import DirectionSampling, ModuleES
from nograd.strategies.nres import NRES
from nograd.strategies.openai_es import OpenAIES
from nograd.workbench.registry import OUTER_OPTIMIZERS, LossFn, StepResult, parse_opts, register_method

if TYPE_CHECKING:
    from nograd.workbench.config import TrainConfig

# method -> defaults for cfg fields left None; "lr" is the method's registered default_lr.
# eggroll's come from 4-minute runs on shakespeare-char (1-layer GPT, B=8, T=32, one CPU thread,
# BENCHMARKS.md): Adam lr 3e-3 beat 1e-2, 3e-2 and 1e-3; rank 1 beat rank 4 per second; sigma
# 0.01 and 0.003 tied; population 256 x 8 rows beat 1024 x 2 rows.
ES_DEFAULTS: dict[str, dict[str, Any]] = {
    "eggroll": {"population": 256, "sigma": 0.01, "rank": 1, "lr": 3e-3},
    "openai-es": {"population": 64, "sigma": 0.01, "rank": 0, "lr": 3e-3},
    "nres": {"population": 128, "sigma": 0.02, "rank": 2, "lr": 3e-3},
    "sep-cma": {"population": 64, "sigma": 0.02},
    "lm-ma-es": {"population": 64, "sigma": 0.02},
    "rm-es": {"population": 64, "sigma": 0.02},
    "snes": {"population": 64, "sigma": 0.02},
    "pgpe": {"population": 64, "sigma": 0.02},
    "cem": {"population": 64, "sigma": 0.02},
    "cma": {"population": None, "sigma": 0.1},
    "ga": {"population": 64, "sigma": 0.002},
}
ES_METHODS = tuple(ES_DEFAULTS)

_MODULE_ES_OPTS = {
    "mode": "batched",
    "chunk": 0,
    "inplace_sgd": False,
    "beta1": 0.9,
    "beta2": 0.999,
    "noise": "gaussian",
}
# how the directions are drawn (DirectionSampling): eggroll and openai-es
_SAMPLING_OPTS = {"orthogonal": False, "guided": 0.0, "guide_history": 4, "sigma_lr": 0.0}
ES_OPTS: dict[str, dict[str, Any]] = {
    "eggroll": {**_MODULE_ES_OPTS, **_SAMPLING_OPTS, "shaping": "zscore", "group_size": 0},
    "openai-es": {**_MODULE_ES_OPTS, **_SAMPLING_OPTS, "shaping": "centered-ranks"},
    "nres": {**_MODULE_ES_OPTS, "reuse": 8, "stagger": True},
}
# flat ask/tell strategies: the adapter's options plus each strategy's own (None: the paper's default)
_ADAPTER_OPTS = {"mode": "auto", "chunk": 0, "noise": "gaussian"}
_STRATEGY_OPTS: dict[str, dict[str, Any]] = {
    "sep-cma": {"c_m": None},
    "lm-ma-es": {"memory": None, "c_sigma": None, "sampling": "auto"},
    "rm-es": {"paths": None, "c_s": None},
    "snes": {"eta_mu": None, "eta_sigma": None},
    "pgpe": {"max_speed": None, "step_size": None, "momentum": None, "stdev_lr": None},
    "cem": {},
    "cma": {"max_dim": None},
    "ga": {"truncation": None, "elitism": None},
}
for _name, _extra in _STRATEGY_OPTS.items():
    ES_OPTS[_name] = {**_ADAPTER_OPTS, **_extra}


def _number(key: str, value: str, method: str) -> int | float | bool:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"--opt {key}={value}: expected a number for {method}") from None


def _pick(cfg: TrainConfig, field: str, method: str) -> Any:
    value = getattr(cfg, field, None)
    return ES_DEFAULTS[method].get(field) if value is None else value


def _outer_optimizers(
    model: nn.Module, cfg: TrainConfig, o: dict[str, Any], method: str
) -> list[torch.optim.Optimizer]:
    """The outer optimizer(s) that step on the ES estimate in ``.grad``."""
    outer = cfg.outer or "adamw"
    if outer not in OUTER_OPTIMIZERS:
        raise UsageError(
            f"--outer {outer!r} is not supported by {method} (choose from {', '.join(OUTER_OPTIMIZERS)})"
        )
    wd = 0.0 if cfg.weight_decay is None else float(cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    betas = (o["beta1"], o["beta2"])
    if outer == "adamw":
        return [adamw(params, cfg.lr, wd, betas)]
    if outer == "adam":
        return [torch.optim.Adam(params, lr=cfg.lr, betas=betas)]
    if outer == "sgd":
        return [torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=wd)]
    return muon_and_adamw(model, cfg.lr, wd, betas)


class ModuleESMethod:
    """Trainer adapter for :class:`ModuleES` (OpenAI-ES, EGGROLL) and :class:`NRES`."""

    def __init__(self, es: ModuleES | NRES, loss_fn: LossFn, lr: float) -> None:
        self.es = es
        self.loss_fn = loss_fn
        self.base_lr = lr
        self.rows = 1  # rows per member of the current batch (NRES's dummy state has as many)
        for opt in es.optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])

    def _set_lr(self, lr_scale: float) -> None:
        if self.es.optimizers:
            for opt in self.es.optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * lr_scale
        else:
            self.es.lr = self.base_lr * lr_scale

    def step(self, x: torch.Tensor, y: torch.Tensor, lr_scale: float) -> StepResult:
        self._set_lr(lr_scale)
        if isinstance(self.es, NRES):
            p = self.es.population
            self.rows = x.shape[0]

            def unroll(
                model: nn.Module, state: torch.Tensor, steps: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
                k = state.shape[0] // x.shape[0]  # the members of this call (a rank's share)
                rows_x = x.repeat(k, *([1] * (x.dim() - 1)))
                rows_y = y.repeat(k, *([1] * (y.dim() - 1)))
                return state, self.loss_fn(model, rows_x, rows_y)

            losses = self.es.step(unroll)
            population = p
        else:
            losses = self.es.step(self.loss_fn, x, y)
            population = self.es.population
        finite = losses[torch.isfinite(losses)]
        info = dict(self.es.last_info)
        info.pop("loss_mean", None)
        return StepResult(loss=float(finite.mean()), forward_tokens=float(population * x.numel()), info=info)

    @property
    def compile_seconds(self) -> float | None:
        """The first compiled population forward's time (``--compile``), once it has run."""
        batched = getattr(self.es, "_batched", None)
        return getattr(batched, "compile_seconds", None)

    def state_dict(self) -> dict:
        return {"es": self.es.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.es.load_state_dict(state["es"])


class AdapterMethod:
    """Trainer adapter for a flat ask/tell strategy via :class:`ModuleAdapter`."""

    def __init__(self, adapter: ModuleAdapter, loss_fn: LossFn) -> None:
        self.adapter = adapter
        self.loss_fn = loss_fn

    def step(self, x: torch.Tensor, y: torch.Tensor, lr_scale: float) -> StepResult:
        losses = self.adapter.step(self.loss_fn, x, y)
        finite = losses[torch.isfinite(losses)]
        info = dict(self.adapter.last_info)
        info.pop("loss_mean", None)
        return StepResult(
            loss=float(finite.mean()),
            forward_tokens=float(self.adapter.strategy.popsize * x.numel()),
            info=info,
        )

    def state_dict(self) -> dict:
        return self.adapter.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.adapter.load_state_dict(state)


def _build_module_es(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig, method: str) -> ModuleESMethod:
    o = parse_opts(cfg.opts, ES_OPTS[method], method)
    population = _pick(cfg, "population", method)
    sigma = _pick(cfg, "sigma", method)
    rank = _pick(cfg, "rank", method)
    if method == "openai-es" and cfg.rank not in (None, 0):
        raise UsageError("openai-es uses dense noise: leave --rank out (or use --optimizer eggroll)")
    opts = [] if o["inplace_sgd"] else _outer_optimizers(model, cfg, o, method)
    common: dict[str, Any] = {
        "sigma": sigma,
        "population": population,
        "optimizer": opts or None,
        "lr": cfg.lr if o["inplace_sgd"] else None,
        "seed": cfg.seed,
        "mode": o["mode"],
        "noise": o["noise"],
        "process_group": default_group(),
        "compile": cfg.compile,
    }
    try:
        if method == "nres":
            if o["reuse"] < 1:
                raise ValueError(f"--opt reuse must be >= 1, got {o['reuse']}")
            holder: list[ModuleESMethod] = []
            es: ModuleES | NRES = NRES(
                model,
                window=1,
                episode_length=o["reuse"],
                init_state=lambda n: torch.zeros(n * holder[0].rows, 1),  # no recurrent state
                rank=rank,
                stagger=o["stagger"],
                stagger_unroll=False,
                **common,
            )
            holder.append(ModuleESMethod(es, loss_fn, cfg.lr))
            return holder[0]
        chunk = o["chunk"] or None
        wd = 0.0  # weight decay goes to the outer optimizer (decoupled); with inplace_sgd, L2 on the estimate
        if o["inplace_sgd"] and cfg.weight_decay:
            wd = float(cfg.weight_decay)
        sampling = DirectionSampling(
            orthogonal=o["orthogonal"],
            guided=o["guided"],
            guide_history=o["guide_history"],
            sigma_lr=o["sigma_lr"],
        )
        if method == "eggroll":
            es = EGGROLL(
                model,
                rank=rank,
                shaping=o["shaping"],
                group_size=o["group_size"],
                chunk_size=chunk,
                weight_decay=wd,
                sampling=sampling,
                **common,
            )
        else:
            es = OpenAIES(
                model, shaping=o["shaping"], chunk_size=chunk, weight_decay=wd, sampling=sampling, **common
            )
    except ValueError as e:
        raise UsageError(f"{method}: {e}") from None
    return ModuleESMethod(es, loss_fn, cfg.lr)


def _build_adapter(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig, method: str) -> AdapterMethod:
    o = parse_opts(cfg.opts, ES_OPTS[method], method)
    kwargs = {}
    for key, default in _STRATEGY_OPTS[method].items():
        if isinstance(default, str):  # a named choice, checked by the strategy
            kwargs[key] = o[key]
        elif o[key] is not None:
            kwargs[key] = _number(key, o[key], method)
    try:
        adapter = ModuleAdapter(
            model,
            method,
            sigma=_pick(cfg, "sigma", method),
            popsize=_pick(cfg, "population", method),
            seed=cfg.seed,
            mode=o["mode"],
            chunk_size=o["chunk"] or None,
            noise=o["noise"],
            process_group=default_group(),
            **kwargs,
        )
    except (ValueError, TypeError) as e:
        raise UsageError(f"{method}: {e}") from None
    return AdapterMethod(adapter, loss_fn)


_SUMMARIES = {
    "eggroll": "EGGROLL ES: rank-r antithetic noise in one batched forward, z-scored, outer AdamW",
    "openai-es": "OpenAI-ES: dense antithetic noise, centered ranks, outer AdamW",
    "nres": "Noise-reuse ES: each worker keeps its noise for --opt reuse batches (GPT: no state)",
    "sep-cma": "sep-CMA-ES (diagonal covariance) on all weights; adapts its own step (no --lr)",
    "lm-ma-es": "LM-MA-ES (limited-memory matrix adaptation) on all weights; no --lr",
    "rm-es": "Rm-ES (rank-m ES) on all weights; adapts its own step (no --lr)",
    "snes": "SNES (separable natural ES) on all weights; adapts its own step (no --lr)",
    "pgpe": "PGPE with ClipUp on all weights; its own step size (no --lr)",
    "cem": "Cross-entropy method (diagonal Gaussian) on all weights; no --lr",
    "cma": "Full CMA-ES; tiny models only (<= 2000 weights); no --lr",
    "ga": "Deep GA: truncation selection, Gaussian mutation, elitism, seed-chain genomes; no --lr",
}


def _register(method: str) -> None:
    lr = ES_DEFAULTS[method].get("lr", 1e-3)
    if method in ("eggroll", "openai-es", "nres"):

        def build(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> ModuleESMethod:
            return _build_module_es(model, loss_fn, cfg, method)

    else:

        def build(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> AdapterMethod:  # type: ignore[misc]
            return _build_adapter(model, loss_fn, cfg, method)

    build.__name__ = f"build_{method.replace('-', '_')}"
    register_method(method, _SUMMARIES[method], True, lr, population=True)(build)


for _method in ES_METHODS:
    _register(_method)
