"""ZO-signSGD: the sign of the SPSA estimate."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .base import Record, dense_estimate
from .mezo import SPSAOptimizer


class ZOSign(SPSAOptimizer):
    r"""ZO-signSGD (Liu et al. 2019, "signSGD via Zeroth-Order Oracle", ICLR 2019).

    The SPSA estimate ``g_hat = (1/n) sum_k g_k z_k`` of :class:`~nograd.zo.MeZO` followed by
    ``theta <- theta - lr (sign(g_hat) + wd * theta)`` (weight decay on tensors with >= 2 dims).
    Every coordinate moves by exactly ``lr``, which makes the step size independent of the
    scale of the loss and of ``eps``; more directions make the sign more reliable.

    Memory: no model-sized buffer; ``g_hat`` of one tensor at a time (a tensor-sized float32
    buffer) because the sign needs the whole sum.

    Example:
        >>> import torch, nograd
        >>> w = torch.tensor([3.0, -2.0], requires_grad=True)
        >>> opt = nograd.ZOSign([w], lr=0.05, eps=1e-3, directions=4)
        >>> for _ in range(100):
        ...     loss = opt.step(lambda: float((w ** 2).sum()))
        >>> bool(loss < 1.0)
        True
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict],
        lr: float = 1e-4,
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

    def apply_record(self, record: Record) -> None:
        generation = int(record["step"])
        groups = record["groups"]
        coeffs = [self.coefficients(record, j) for j in range(len(groups))]
        with torch.no_grad():
            for i in range(len(self.space)):
                j = self.group_of[i]
                h = groups[j]
                g = dense_estimate(self.space, self.noise, i, generation, coeffs[j]).sign_()
                self.decay_(i, h["lr"], h.get("weight_decay", 0.0), generation)
                self.add_to_weight_(i, g, -h["lr"], generation)
