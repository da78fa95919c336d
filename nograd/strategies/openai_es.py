"""OpenAI-ES (Salimans, Ho, Chen, Sidor, Sutskever 2017, arXiv 1703.03864) on a torch module.

The paper's estimator with its three ingredients - antithetic ("mirrored") sampling,
centered-rank fitness shaping and weight decay - on dense Gaussian noise over every trainable
tensor (``ParamSpace(rank=0)``). For a generation ``t`` with ``P = 2n`` members:

    eps_k ~ N(0, I),      members  theta + sigma eps_k  and  theta - sigma eps_k,
    u = centered_ranks(L)                 (in [-0.5, 0.5], the worst loss gets +0.5)
    g = 1/(P sigma) sum_k (u_k^+ - u_k^-) eps_k  +  wd * theta
    theta <- optimizer(theta, g)          (the paper uses Adam; any torch optimizer works)

The paper folds ``1/sigma`` into the step size and maximises a return; here ``g`` is an
estimate of the gradient of the (Gaussian-smoothed) loss, written into ``.grad`` so that
SGD, Adam, AdamW or ``torch.optim.Muon`` take the step, or applied as a plain in-place SGD
step when no optimizer is given (``lr=``). The paper's L2 coefficient was 0.005 with sigma
0.02 for MuJoCo; both are arguments here.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> x = torch.randn(64, 2); y = x[:, :1] * x[:, 1:]
    >>> loss_fn = lambda m, x, y: ((m(x) - y) ** 2).mean(1)
    >>> es = OpenAIES(model, sigma=0.05, population=32,
    ...               optimizer=torch.optim.Adam(model.parameters(), lr=0.02), seed=0)
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

from .module_es import DirectionSampling, ModuleES


class OpenAIES(ModuleES):
    """OpenAI-ES: antithetic dense Gaussian noise, centered ranks, weight decay, any optimizer.

    See :class:`~nograd.strategies.module_es.ModuleES` for the arguments; ``rank`` is fixed to 0
    (dense noise) and ``shaping`` defaults to centered ranks as in the paper. The paper's shared
    noise table is ``noise="gaussian-table"``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma: float = 0.02,
        population: int = 64,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        lr: float | None = None,
        weight_decay: float = 0.0,
        shaping: str = "centered-ranks",
        seed: int = 0,
        mode: str = "batched",
        chunk_size: int | None = None,
        antithetic: bool = True,
        noise: str = "gaussian",
        process_group: Any = None,
        compile: bool = False,
        sampling: DirectionSampling | None = None,
    ) -> None:
        super().__init__(
            model,
            sigma=sigma,
            population=population,
            rank=0,
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
