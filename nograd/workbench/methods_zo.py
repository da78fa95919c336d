"""Zeroth-order optimizers as trainer methods: ``nograd train --optimizer mezo`` and friends.

Registered names: ``mezo``, ``zo-sign``, ``zo-momentum``, ``zo-adam``, ``hizoo``,
``forward-grad``. Each wraps the optimizer of the same name in :mod:`nograd.zo`; the closure is
``loss_fn(model, x, y).mean()``.

Flags read: ``--lr`` (peak, scaled by the schedule), ``--eps`` (perturbation size),
``--directions`` (SPSA directions, or tangents for ``forward-grad``), ``--weight-decay``
(default 0, on tensors with >= 2 dims), ``--rank`` (low-rank noise for matrices, default dense),
``--seed``. ``--opt`` keys: ``one_sided``, ``distribution`` (not for hizoo), ``momentum``,
``buffer``, ``window`` (zo-momentum), ``beta1``, ``beta2``, ``adam_eps`` (zo-adam),
``hessian_smooth`` (hizoo), and ``trajectory=PATH`` (or ``auto`` for ``<out>/trajectory.jsonl``)
to log every step for ``nograd replay``; the initial weights are then saved next to it as
``<log>.init.pt`` when the log is started.

Forward-token accounting (a token through one forward pass = 1): SPSA methods spend
``2 n`` forwards per step (``n + 1`` one-sided, ``2 n + 1`` for HiZOO), so
``forward_tokens = forwards * B * T``. A forward-gradient ``jvp`` is counted as 3 forwards per
tangent: the primal pass plus a tangent pass that does two matmuls per linear layer (the same
work as a backward, which nograd counts as 2).

Defaults are for training the default char GPT (4 layers, 128 wide, ~0.8M parameters) from
scratch on Tiny Shakespeare, where zeroth-order methods are slow: one or a few random directions
per step for ~0.8M parameters. Picked from short sweeps (300 steps at constant lr, batch 12 x 64,
seed 0, validation loss from 4.19, 4 eval batches)::

    mezo          lr 1e-3 (eps 1e-3, 1 direction)      3.53   (lr 3e-4: 3.77, 3e-3: diverged, 4.18)
    zo-sign       lr 1e-3 (4 directions)               3.60   (lr 3e-4: 3.87)
    zo-momentum   lr 1e-4 (momentum 0.9)               3.56   (lr 2e-4: 3.61)
    zo-adam       lr 3e-3 (betas 0.9/0.999)            3.59   (lr 1e-3: 3.80)
    hizoo         lr 2e-3 (hessian_smooth 1e-5)        3.58   (lr 1e-3 with 1e-4: 3.93, the diagonal grows)
    forward-grad  lr 1e-3 (1 tangent)                  3.55

The loss goes down steadily but stays far behind AdamW per step. Every perturbed forward of one
step sees the same dropout mask (the RNG is reset before each), so the loss differences measure
the perturbation only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from nograd.core.distributed import default_group
from nograd.core.shaping import NonFiniteFitnessError
from nograd.workbench.registry import LossFn, StepResult, parse_opts, register_method

if TYPE_CHECKING:
    from nograd.workbench.config import TrainConfig
    from nograd.zo import ZOOptimizer


@contextmanager
def _math_attention(model: nn.Module):
    """Temporarily switch fused-SDPA attention layers to plain matmuls (jvp has no SDPA rule)."""
    switched = [m for m in model.modules() if getattr(m, "attention", None) == "sdpa"]
    for m in switched:
        m.attention = "math"
    try:
        yield
    finally:
        for m in switched:
            m.attention = "sdpa"


class ZOMethod:
    """A :class:`nograd.zo.ZOOptimizer` driven by the trainer (``Method`` protocol)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: ZOOptimizer,
        *,
        functional: bool = False,
        init_path: str | os.PathLike | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.functional = functional  # step(fn(model)) for forward gradients
        self.init_path = init_path
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])

    def _save_init(self) -> None:
        log = self.optimizer.log_path
        if self.init_path is None or log is None:
            return
        if not Path(log).exists() or Path(log).stat().st_size == 0:  # a new log: its step 0 starts here
            Path(self.init_path).parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.model.state_dict(), self.init_path)
        self.init_path = None

    def step(self, x: torch.Tensor, y: torch.Tensor, lr_scale: float) -> StepResult:
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_scale
        self._save_init()
        self.model.train()
        cuda = x.device.type == "cuda"
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(x.device) if cuda else None

        def same_rng() -> None:  # common random numbers: one dropout mask for every evaluation
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, x.device)

        opt = self.optimizer
        try:
            if self.functional:

                def fn(m: nn.Module) -> torch.Tensor:
                    same_rng()
                    return self.loss_fn(m, x, y).mean()

                with _math_attention(self.model):
                    loss = opt.step(fn)
            else:

                def closure() -> torch.Tensor:
                    same_rng()
                    return self.loss_fn(self.model, x, y).mean()

                loss = opt.step(closure)
        except NonFiniteFitnessError:
            # weights untouched; the next step draws new noise
            spent = opt.last_info.get("forwards", 0.0)
            info = {"nonfinite": opt.last_info.get("nonfinite", 0.0), "skipped": 1.0}
            return StepResult(loss=math.nan, forward_tokens=spent * x.numel(), info=info)
        info = {"nonfinite": opt.last_info["nonfinite"]}
        return StepResult(loss=loss, forward_tokens=opt.last_info["forwards"] * x.numel(), info=info)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


# ------------------------------------------------------------------------------------ builders


def _log_paths(value: str, cfg: TrainConfig) -> tuple[str | None, str | None]:
    if not value:
        return None, None
    path = os.path.join(cfg.out or ".", "trajectory.jsonl") if value == "auto" else value
    return path, path + ".init.pt"


def _common(cfg: TrainConfig, o: dict[str, Any], eps: float, directions: int) -> dict[str, Any]:
    return {
        "lr": cfg.lr,
        "eps": eps if cfg.eps is None else cfg.eps,
        "directions": directions if cfg.directions is None else cfg.directions,
        "weight_decay": 0.0 if cfg.weight_decay is None else cfg.weight_decay,
        "seed": cfg.seed,
        "process_group": default_group(),
    }


def _spsa(o: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    return {
        "one_sided": o["one_sided"],
        "distribution": o["distribution"],
        "noise_rank": cfg.rank or 0,
    }


def _wrap(
    model: nn.Module,
    loss_fn: LossFn,
    cfg: TrainConfig,
    o: dict[str, Any],
    make: Callable[..., ZOOptimizer],
    functional: bool = False,
) -> ZOMethod:
    from nograd.core.errors import UsageError

    log, init = _log_paths(o["trajectory"], cfg)
    try:
        opt = make(log_path=log)
    except ValueError as e:  # bad hyperparameters are user errors here
        raise UsageError(str(e)) from None
    return ZOMethod(model, loss_fn, opt, functional=functional, init_path=init)


_SPSA_OPTS = {"one_sided": False, "distribution": "gaussian", "trajectory": ""}
_MEZO_EPS, _MEZO_DIRS = 1e-3, 1
_SIGN_EPS, _SIGN_DIRS = 1e-3, 4  # the sign of one direction is mostly noise


@register_method(
    "mezo", "MeZO / ZO-SGD: SPSA with in-place seeded perturbations, inference memory", True, 1e-3
)
def build_mezo(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> ZOMethod:
    from nograd.zo import MeZO

    o = parse_opts(cfg.opts, _SPSA_OPTS, "mezo")
    kw = {**_common(cfg, o, _MEZO_EPS, _MEZO_DIRS), **_spsa(o, cfg)}
    return _wrap(model, loss_fn, cfg, o, lambda **k: MeZO(model, **kw, **k))


@register_method("zo-sign", "ZO-signSGD: the sign of the SPSA estimate (no extra memory)", True, 1e-3)
def build_zo_sign(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> ZOMethod:
    from nograd.zo import ZOSign

    o = parse_opts(cfg.opts, _SPSA_OPTS, "zo-sign")
    kw = {**_common(cfg, o, _SIGN_EPS, _SIGN_DIRS), **_spsa(o, cfg)}
    return _wrap(model, loss_fn, cfg, o, lambda **k: ZOSign(model, **kw, **k))


_MOMENTUM_OPTS = {**_SPSA_OPTS, "momentum": 0.9, "buffer": "full", "window": 32}


@register_method(
    "zo-momentum", "ZO-SGD with momentum (model-sized buffer, or buffer=replay from seeds)", True, 1e-4
)
def build_zo_momentum(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> ZOMethod:
    from nograd.zo import ZOMomentum

    o = parse_opts(cfg.opts, _MOMENTUM_OPTS, "zo-momentum")
    kw = {
        **_common(cfg, o, _MEZO_EPS, _MEZO_DIRS),
        **_spsa(o, cfg),
        "momentum": o["momentum"],
        "buffer": o["buffer"],
        "window": o["window"],
    }
    return _wrap(model, loss_fn, cfg, o, lambda **k: ZOMomentum(model, **kw, **k))


_ADAM_OPTS = {**_SPSA_OPTS, "beta1": 0.9, "beta2": 0.999, "adam_eps": 1e-8}


@register_method("zo-adam", "ZO-Adam: Adam on the SPSA estimate (two model-sized buffers)", True, 3e-3)
def build_zo_adam(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> ZOMethod:
    from nograd.zo import ZOAdam

    o = parse_opts(cfg.opts, _ADAM_OPTS, "zo-adam")
    kw = {
        **_common(cfg, o, _MEZO_EPS, _MEZO_DIRS),
        **_spsa(o, cfg),
        "betas": (o["beta1"], o["beta2"]),
        "adam_eps": o["adam_eps"],
    }
    return _wrap(model, loss_fn, cfg, o, lambda **k: ZOAdam(model, **kw, **k))


_HIZOO_OPTS = {"hessian_smooth": 1e-5, "trajectory": ""}


@register_method("hizoo", "HiZOO: ZO-SGD preconditioned by a diagonal Hessian (3 forwards/step)", True, 2e-3)
def build_hizoo(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> ZOMethod:
    from nograd.core.errors import UsageError
    from nograd.zo import HiZOO

    o = parse_opts(cfg.opts, _HIZOO_OPTS, "hizoo")
    if cfg.rank:
        raise UsageError("hizoo needs dense noise: drop --rank")
    kw = {**_common(cfg, o, _MEZO_EPS, _MEZO_DIRS), "hessian_smooth": o["hessian_smooth"]}
    return _wrap(model, loss_fn, cfg, o, lambda **k: HiZOO(model, **kw, **k))


_FG_OPTS = {"distribution": "gaussian", "trajectory": ""}


@register_method(
    "forward-grad", "forward gradient descent: jvp directional derivatives (Baydin et al. 2022)", True, 1e-3
)
def build_forward_grad(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig) -> ZOMethod:
    from nograd.zo import ForwardGradient

    o = parse_opts(cfg.opts, _FG_OPTS, "forward-grad")
    kw = {
        "lr": cfg.lr,
        "tangents": 1 if cfg.directions is None else cfg.directions,
        "weight_decay": 0.0 if cfg.weight_decay is None else cfg.weight_decay,
        "noise_rank": cfg.rank or 0,
        "distribution": o["distribution"],
        "seed": cfg.seed,
        "process_group": default_group(),
    }
    return _wrap(model, loss_fn, cfg, o, lambda **k: ForwardGradient(model, **kw, **k), functional=True)
