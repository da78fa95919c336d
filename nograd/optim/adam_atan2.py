"""Adam-atan2 (Everett et al. 2024, "Scaling Exponents Across Parameterizations and Optimizers").

Adam divides the first moment by the root of the second plus an epsilon, and that epsilon
sets a scale below which gradients are not normalised. Adam-atan2 replaces the division by
``atan2``, which needs no epsilon, is invariant to the scale of the gradient and bounds each
coordinate's step by ``lr * a * pi / 2``::

    m_t = beta1 m_{t-1} + (1 - beta1) g_t          v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    m_hat = m_t / (1 - beta1^t)                    v_hat = v_t / (1 - beta2^t)
    theta_t = theta_{t-1} (1 - lr wd) - lr a atan2(m_hat, b sqrt(v_hat))

For small ``|m_hat| / sqrt(v_hat)``, ``a atan2(m_hat, b sqrt(v_hat)) ~ (a / b) m_hat / sqrt(v_hat)``:
Adam's update. The defaults a = 1.27 (about 4/pi) and b = 1 are those of the paper's released
optimizer (lucidrains/adam-atan2-pytorch), as are the betas; the weight decay is decoupled.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> opt = AdamAtan2([w], lr=0.1)
    >>> (w ** 2).sum().backward(); opt.step()
    >>> w.detach()  # first step: atan2(g, |g|) = pi/4 per coordinate, times a
    tensor([ 0.9003, -1.9003])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from nograd.optim._common import call_closure, check_lr_betas


class AdamAtan2(torch.optim.Optimizer):
    """Adam with ``atan2(m_hat, b sqrt(v_hat))`` in place of ``m_hat / (sqrt(v_hat) + eps)``."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        a: float = 1.27,
        b: float = 1.0,
    ) -> None:
        check_lr_betas(lr, betas)
        if weight_decay < 0 or a <= 0 or b <= 0:
            raise ValueError("weight_decay must be >= 0, and a and b > 0")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, a=a, b=b))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = call_closure(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                m_hat = m / (1 - beta1**t)
                b_sqrt_v_hat = v.div(1 - beta2**t).sqrt_().mul_(group["b"])
                p.add_(torch.atan2(m_hat, b_sqrt_v_hat), alpha=-group["lr"] * group["a"])
        return loss
