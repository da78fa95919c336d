"""EGGROLL: evolution strategies with low-rank perturbations (Sarkar et al. 2025, arXiv 2511.16652).

Each matrix ``W`` (m x n) of member ``i`` is perturbed by a rank-r matrix instead of dense noise:

    E_i = A_i B_i^T / sqrt(r),    A_i ~ N(0, I_{m x r}),  B_i ~ N(0, I_{n x r}),

so a population of ``P`` members runs as ONE batched forward: the shared product ``x W^T``
plus the cheap per-member term ``sigma (x B_i) A_i^T / sqrt(r)`` (vectors, biases and norm
weights get small dense noise). Antithetic pairs share ``(A_i, B_i)`` with signs +1/-1.

Fitness (the paper maximises ``f``; here ``f = -loss``) is z-scored as in the reference
implementation: with ``group_size = 0`` over the whole population, otherwise the mean is
subtracted within consecutive groups of ``group_size`` members (e.g. 2: each antithetic pair,
or the members sharing one prompt) and the result divided by the population's std:

    u_i = (L_i - mean_{group(i)} L) / (std(L) + eps).

The update ``mu_{t+1} = mu_t + alpha/N sum_i f_i E_i`` is, written as a loss gradient,

    g = 1/(P sigma) sum_i u_i s_i E_i = 1/(P sigma sqrt(r)) [A*c] B^T   (one GEMM per matrix),

with ``A*c`` the factors stacked over directions and scaled by their coefficients
(:func:`nograd.core.engine.accumulate`). ``g`` goes into ``.grad`` for any torch optimizer (the
paper's experiments use Adam or SGD), so the summed low-rank perturbations give a full-rank step.
The default here is ``r = 1``, the cheapest setting and the reference implementation's noiser
default; the paper works with small ranks and shows the low-rank update approaches full-rank ES
as ``r`` grows, at an ``O(1/r)`` rate. On the char GPT rank 1 also trained fastest per second
(rank 4 did not pay for its extra cost), so it is the trainer's default too.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> x = torch.randn(64, 2); y = x[:, :1] * x[:, 1:]
    >>> loss_fn = lambda m, x, y: ((m(x) - y) ** 2).mean(1)
    >>> es = EGGROLL(model, sigma=0.05, population=64, rank=1,
    ...              optimizer=torch.optim.Adam(model.parameters(), lr=0.02), seed=0)
    >>> first = es.step(loss_fn, x, y).mean()
    >>> for _ in range(100):
    ...     last = es.step(loss_fn, x, y).mean()
    >>> bool(last < first)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.shaping import SHAPINGS, sanitize, shape
from .module_es import DirectionSampling, ModuleES


def group_zscore(losses: torch.Tensor, group_size: int = 0, eps: float = 1e-8) -> torch.Tensor:
    """EGGROLL's fitness normalisation: subtract the group mean, divide by the global std.

    ``group_size = 0`` is a plain z-score over the population.
    """
    x = torch.as_tensor(losses, dtype=torch.float64).flatten()
    std = x.std(unbiased=False) if x.numel() > 1 else torch.zeros((), dtype=torch.float64)
    if group_size == 0:
        centered = x - x.mean()
    else:
        if x.numel() % group_size:
            raise ValueError(f"{x.numel()} losses do not split into groups of {group_size}")
        g = x.view(-1, group_size)
        centered = (g - g.mean(1, keepdim=True)).flatten()
    return centered / (std + eps)


class EGGROLL(ModuleES):
    """EGGROLL on a module: rank-r antithetic perturbations on the batched engine.

    Args (beyond :class:`~nograd.strategies.module_es.ModuleES`):
        rank: rank r of each matrix perturbation (>= 1; default 1).
        shaping: ``"zscore"`` (the paper's), ``"centered-ranks"`` or ``"raw"``.
        group_size: for ``"zscore"``: 0 normalises over the population, k > 0 subtracts the
            mean of each group of k consecutive members (2 = each antithetic pair).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma: float = 0.05,
        population: int = 256,
        rank: int = 1,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        lr: float | None = None,
        weight_decay: float = 0.0,
        shaping: str = "zscore",
        group_size: int = 0,
        seed: int = 0,
        mode: str = "batched",
        chunk_size: int | None = None,
        antithetic: bool = True,
        noise: str = "gaussian",
        process_group: Any = None,
        compile: bool = False,
        sampling: DirectionSampling | None = None,
    ) -> None:
        if int(rank) != rank or rank < 1:
            raise ValueError(f"EGGROLL needs rank >= 1 (rank 0 is OpenAI-ES), got {rank}")
        if shaping not in SHAPINGS:
            raise ValueError(f"shaping must be one of {SHAPINGS}, got {shaping!r}")
        if int(group_size) != group_size or group_size < 0 or (group_size and population % group_size):
            raise ValueError(
                f"group_size must be 0 or a divisor of the population ({population}), got {group_size}"
            )
        if group_size == 1:
            raise ValueError("group_size=1 would zero every utility; use 0 (whole population) or >= 2")
        if group_size and shaping != "zscore":
            raise ValueError("group_size applies to shaping='zscore' only")
        self.group_size = int(group_size)
        super().__init__(
            model,
            sigma=sigma,
            population=population,
            rank=rank,
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            shaping=shaping,
            seed=seed,
            antithetic=antithetic,
            mode=mode,
            chunk_size=chunk_size,
            noise=noise,
            process_group=process_group,
            compile=compile,
            sampling=sampling,
        )

    def utilities(self, losses: torch.Tensor) -> tuple[torch.Tensor, int]:
        if self.shaping != "zscore":
            return shape(losses, self.shaping)
        clean, n_bad = sanitize(losses)
        return group_zscore(clean, self.group_size), n_bad
