"""Forward gradient descent: directional derivatives from forward-mode AD, no backward pass."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .base import Evaluation, Record, SGDRule, ZOOptimizer, check_int
from .estimators import ForwardGradientEstimator


class ForwardGradient(SGDRule, ZOOptimizer):
    r"""Forward gradient descent (Baydin et al. 2022, "Gradients without Backpropagation",
    arXiv 2202.08587).

    For tangents ``v_k ~ N(0, I)`` keyed by ``(seed, step, k)``, the directional derivative
    ``d_k = grad f(theta) . v_k`` is computed exactly by one forward-mode pass
    (``torch.func.jvp`` over ``torch.func.functional_call``), then

    * ``g = (1/K) sum_k d_k v_k``  (unbiased: ``E[v v^T] = I``),
    * ``theta <- theta - lr (g + wd * theta)`` (weight decay on tensors with >= 2 dims).

    ``step(fn)`` takes a function of the model, not a closure: ``fn(model) -> loss`` is called
    with the module's trainable parameters replaced by dual tensors, e.g.
    ``opt.step(lambda m: F.cross_entropy(m(x), y))``. When built from bare tensors, ``fn``
    receives the list of those tensors instead. Every op needs a forward-AD formula (the GPT's
    ``attention="math"``, not the fused SDPA kernels).

    Cost: one ``jvp`` per tangent, counted as 3 forward-equivalents (a forward plus a tangent
    pass with two matmuls per linear layer, the same work as a backward). Memory: one
    model-sized tangent (parameter dtype) at a time plus the activations' tangents of the
    current layer; no stored activations, no gradient buffer (the update is added in place).

    Example:
        >>> import torch, nograd
        >>> model = torch.nn.Linear(4, 1)
        >>> x = torch.randn(64, 4); y = x.sum(1, keepdim=True)
        >>> opt = nograd.ForwardGradient(model, lr=0.05, tangents=4)
        >>> first = opt.step(lambda m: torch.nn.functional.mse_loss(m(x), y))
        >>> for _ in range(100):
        ...     loss = opt.step(lambda m: torch.nn.functional.mse_loss(m(x), y))
        >>> loss < first
        True
    """

    _strict = ()

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict],
        lr: float = 1e-3,
        tangents: int = 1,
        weight_decay: float = 0.0,
        noise_rank: int = 0,
        distribution: str = "gaussian",
        seed: int = 0,
        *,
        module: nn.Module | None = None,
        log_path: str | os.PathLike | None = None,
        trajectory: Callable[[Record], None] | None = None,
        process_group: Any = None,
    ) -> None:
        check_int("tangents", tangents, 1)
        super().__init__(
            params,
            {"lr": lr, "weight_decay": weight_decay},
            noise_rank=noise_rank,
            distribution=distribution,
            seed=seed,
            log_path=log_path,
            trajectory=trajectory,
            process_group=process_group,
            header_kwargs={"tangents": tangents},
        )
        self.tangents = int(tangents)
        self.estimator = ForwardGradientEstimator(
            self.space,
            tangents=tangents,
            noise_rank=noise_rank,
            distribution=distribution,
            seed=seed,
            module=module if module is not None else self.module,
        )
        self.sync_noise()

    def evaluate(self, closure: Callable[[Any], Any], generation: int) -> Evaluation:
        return self.estimator.evaluate(closure, generation)

    def proj_grads(self, evaluation: Evaluation) -> list[list[float]]:
        return [list(evaluation.diffs) for _ in self.param_groups]

    def step(self, closure: Callable[[Any], Any] | None = None) -> float:  # type: ignore[override]
        """One step of forward gradient descent; ``closure`` is ``fn(model) -> loss`` (see class doc)."""
        return super().step(closure)
