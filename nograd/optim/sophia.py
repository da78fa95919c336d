"""SophiaG (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer").

Sign momentum, scaled per coordinate by a diagonal Hessian estimate and clipped::

    theta <- theta (1 - lr wd)                               (decoupled weight decay)
    m     <- beta1 m + (1 - beta1) g
    theta <- theta - lr sign(m) min(|m| / (rho bs h + 1e-15), 1)

Every k steps (k = 10 in the paper), after the normal step, the caller refreshes ``h`` with the
Gauss-Newton-Bartlett estimator: a forward on a batch, targets *sampled from the model's own
output distribution*, a backward of the mean loss on them, the gradient ``g_hat`` clipped as
usual, then :meth:`SophiaG.update_hessian`::

    h <- beta2 h + (1 - beta2) g_hat * g_hat

``bs`` is the number of predictions in that batch (tokens for a language model): ``g_hat`` is
the gradient of a mean, so ``bs g_hat^2`` estimates the diagonal. ``h`` starts at zero and has
no bias correction, so until the first refresh the step is ``lr sign(m)`` (the official code
does the same). Defaults follow the official GPT-2 recipe (Liuhong99/Sophia): betas
(0.965, 0.99), rho 0.04 (0.05 in its config), weight decay on the caller's choice of tensors.
``rho`` sets how many coordinates are clipped; the paper tunes it so that 10-50% are not
(:meth:`SophiaG.unclipped_fraction` reports it for the last step).

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> opt = SophiaG([w], lr=0.1, weight_decay=0.0, bs=1)
    >>> (w ** 2).sum().backward(); opt.step()  # h = 0: a pure sign step
    >>> w.detach()
    tensor([ 0.9000, -1.9000])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from nograd.optim._common import call_closure, check_lr_betas


class SophiaG(torch.optim.Optimizer):
    """Clipped, Hessian-scaled sign momentum; call :meth:`update_hessian` every k steps."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        bs: int = 5120,
    ) -> None:
        check_lr_betas(lr, betas)
        if not rho > 0 or weight_decay < 0 or bs < 1:
            raise ValueError("rho must be > 0, weight_decay >= 0 and bs >= 1")
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, bs=bs))
        self._clipped = self._total = 0

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["hessian"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def update_hessian(self) -> None:
        """``h <- beta2 h + (1 - beta2) g * g`` with ``.grad`` holding the sampled-target gradient."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is not None:
                    self._state(p)["hessian"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = call_closure(closure)
        clipped: torch.Tensor | int = 0  # summed on the device: no host sync per tensor
        total = 0
        for group in self.param_groups:
            beta1 = group["betas"][0]
            scale = group["rho"] * group["bs"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                m = state["exp_avg"]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                m.lerp_(p.grad, 1 - beta1)
                ratio = (m.abs() / (scale * state["hessian"] + 1e-15)).clamp_(max=1.0)
                clipped = clipped + (ratio == 1.0).sum()
                total += ratio.numel()
                p.addcmul_(m.sign(), ratio, value=-group["lr"])
        self._clipped, self._total = clipped, total
        return loss

    def unclipped_fraction(self) -> float:
        """The share of coordinates whose last step was not clipped (the paper aims at 0.1-0.5)."""
        return 1.0 - float(self._clipped) / self._total if self._total else 0.0
