"""MeZO: zeroth-order SGD (SPSA) at inference memory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .base import Closure, Evaluation, Record, SGDRule, ZOOptimizer, check_int
from .estimators import SPSAEstimator


class SPSAOptimizer(ZOOptimizer):
    """Base of the optimizers driven by the shared SPSA estimator (MeZO, ZO-sign, -momentum, -Adam)."""

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        directions: int,
        one_sided: bool,
        noise_rank: int,
        distribution: str,
        seed: int,
        log_path: str | os.PathLike | None,
        trajectory: Callable[[Record], None] | None,
        header_kwargs: dict[str, Any] | None = None,
        process_group: Any = None,
    ) -> None:
        check_int("directions", directions, 1)
        super().__init__(
            params,
            defaults,
            noise_rank=noise_rank,
            distribution=distribution,
            seed=seed,
            log_path=log_path,
            trajectory=trajectory,
            process_group=process_group,
            header_kwargs={"directions": directions, "one_sided": bool(one_sided), **(header_kwargs or {})},
        )
        self.directions = int(directions)
        self.one_sided = bool(one_sided)
        self.estimator = SPSAEstimator(
            self.space,
            eps=defaults["eps"],
            directions=directions,
            one_sided=one_sided,
            noise_rank=noise_rank,
            distribution=distribution,
            seed=seed,
        )
        self.sync_noise()

    def evaluate(self, closure: Closure, generation: int) -> Evaluation:
        return self.estimator.evaluate(closure, generation, eps=self.group_eps())


class MeZO(SGDRule, SPSAOptimizer):
    r"""MeZO: memory-efficient zeroth-order SGD (Malladi et al. 2023, arXiv 2305.17333).

    SPSA (Spall 1992) with the perturbations applied in place and regenerated from seeds, so a
    step needs inference memory only. With ``z_k ~ N(0, I)`` keyed by ``(seed, step, k)``:

    * two-sided: ``g_k = (L(theta + eps z_k) - L(theta - eps z_k)) / (2 eps)`` (2n forwards),
    * one-sided: ``g_k = (L(theta + eps z_k) - L(theta)) / eps`` (n + 1 forwards),
    * ``theta <- theta - lr ((1/n) sum_k g_k z_k + wd * theta)``, the weight decay only on
      tensors with >= 2 dims (not biases or norm weights).

    Directions whose losses are NaN/inf are skipped (``last_info["nonfinite"]``); when all are,
    :class:`~nograd.core.shaping.NonFiniteFitnessError` is raised and the weights are untouched.

    Memory: no model-sized buffer. The perturbation copies one module's parameters at a time
    (:class:`~nograd.core.engine.InPlacePerturbation`, bit-exact restore); the update adds the
    regenerated noise to the weights block by block (:func:`~nograd.core.engine.accumulate`).
    Measured on a 128 MB model (8 x Linear(2048, 2048), float32, CPU): +25 MB peak for a step
    (one Linear's weights plus one 4 MB noise chunk), against +137 MB for ZO-momentum's full
    buffer and +295 MB for ZO-Adam.

    The first step (also after ``load_state_dict`` into a fresh optimizer) runs the closure once
    unperturbed to learn which module uses which tensor; it is counted in ``last_info``.

    Args:
        params: ``model.parameters()``, ``model.named_parameters()``, param groups (each may set
            ``lr``, ``eps``, ``weight_decay``), or an ``nn.Module``. Only tensors with
            ``requires_grad=True`` are perturbed and updated.
        lr, eps, directions, one_sided, weight_decay: as above.
        noise_rank: 0 for dense noise; ``r > 0`` for low-rank matrix noise ``A B^T / sqrt(r)``.
        distribution: ``"gaussian"``, ``"rademacher"``, ``"gaussian-table"`` or ``"gaussian-counter"``
            (faster, see ``nograd.core.noise``).
        seed: the noise seed (saved in ``state_dict``, so a resumed run draws the same noise).
        log_path: append each step to this JSONL trajectory log (see :mod:`nograd.zo.replay`).
        trajectory: called with each step's record (a JSON-able dict).
        process_group: a ``torch.distributed`` process group to share the directions with (each
            rank evaluates its block, one all-gather of the losses; see :mod:`nograd.core.distributed`).

    Example:
        >>> import torch, nograd
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(5, 1)
        >>> x = torch.randn(64, 5); y = x @ torch.ones(5, 1)
        >>> opt = nograd.MeZO(model, lr=2e-2, eps=1e-3, directions=2)
        >>> first = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        >>> for _ in range(50):
        ...     loss = opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        >>> loss < first
        True
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict],
        lr: float = 1e-6,
        eps: float = 1e-3,
        directions: int = 1,
        one_sided: bool = False,
        weight_decay: float = 0.0,
        noise_rank: int = 0,
        distribution: str = "gaussian",
        seed: int = 0,
        *,
        log_path: str | os.PathLike | None = None,
        trajectory: Callable[[Record], None] | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            params,
            {"lr": lr, "eps": eps, "weight_decay": weight_decay},
            directions=directions,
            one_sided=one_sided,
            noise_rank=noise_rank,
            distribution=distribution,
            seed=seed,
            log_path=log_path,
            trajectory=trajectory,
            process_group=process_group,
        )
