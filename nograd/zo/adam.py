"""ZO-Adam: Adam on the SPSA gradient estimate."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .base import Record, check_positive, dense_estimate
from .mezo import SPSAOptimizer


class ZOAdam(SPSAOptimizer):
    r"""ZO-Adam / ZO-AdaMM (Chen et al. 2019, "ZO-AdaMM", NeurIPS; benchmarked for LLM fine-tuning
    by Zhang et al. 2024, "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM
    Fine-Tuning", arXiv 2402.11592): Adam (Kingma & Ba 2015) applied to the SPSA estimate.

    With ``g_hat_t`` the SPSA estimate of :class:`~nograd.zo.MeZO` and ``t`` the number of
    updates so far:

    * ``m_t = beta1 m_{t-1} + (1 - beta1) g_hat_t``,  ``v_t = beta2 v_{t-1} + (1 - beta2) g_hat_t^2``,
    * ``theta <- theta - lr (m_t / (1 - beta1^t)) / (sqrt(v_t / (1 - beta2^t)) + adam_eps)
      - lr wd theta`` (decoupled weight decay as in AdamW, tensors with >= 2 dims).

    ``eps`` is the SPSA perturbation size; ``adam_eps`` is Adam's denominator constant.

    Memory: **two model-sized float32 buffers** (``exp_avg`` and ``exp_avg_sq``, 8 bytes per
    trainable parameter), plus ``g_hat`` of one tensor at a time.

    Example:
        >>> import torch, nograd
        >>> w = torch.tensor([3.0, -2.0], requires_grad=True)
        >>> opt = nograd.ZOAdam([w], lr=0.05, eps=1e-3, directions=2)
        >>> for _ in range(200):
        ...     loss = opt.step(lambda: float((w ** 2).sum()))
        >>> bool(loss < 0.5)
        True
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict],
        lr: float = 1e-4,
        eps: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
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
        self._updates = 0
        super().__init__(
            params,
            {"lr": lr, "eps": eps, "weight_decay": weight_decay, "betas": tuple(betas), "adam_eps": adam_eps},
            directions=directions,
            one_sided=one_sided,
            noise_rank=noise_rank,
            distribution=distribution,
            seed=seed,
            log_path=log_path,
            trajectory=trajectory,
            process_group=process_group,
        )

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        betas = group.get("betas")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        for b in betas:
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1:
                raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        check_positive("adam_eps", group.get("adam_eps"))

    def apply_record(self, record: Record) -> None:
        generation = int(record["step"])
        groups = record["groups"]
        coeffs = [self.coefficients(record, j) for j in range(len(groups))]
        t = self._updates + 1
        with torch.no_grad():
            for i, p in enumerate(self.space.tensors):
                j = self.group_of[i]
                h = groups[j]
                beta1, beta2 = h["betas"]
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                g = dense_estimate(self.space, self.noise, i, generation, coeffs[j])
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = v.sqrt().div_(math.sqrt(1.0 - beta2**t)).add_(h["adam_eps"])
                step = g.copy_(m).div_(denom)  # reuse g's buffer
                self.decay_(i, h["lr"], h.get("weight_decay", 0.0), generation)
                self.add_to_weight_(i, step, -h["lr"] / (1.0 - beta1**t), generation)
        self._updates = t

    def zo_state(self) -> dict[str, Any]:
        return {**super().zo_state(), "updates": self._updates}

    def load_zo_state(self, state: dict[str, Any]) -> None:
        super().load_zo_state(state)
        self._updates = int(state.get("updates", 0))
