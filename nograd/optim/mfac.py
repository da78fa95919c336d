"""M-FAC (Frantar et al. 2021, "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information").

Preconditions the gradient by the inverse of the damped empirical Fisher of the last m
gradients, one estimator over all parameters (flattened into one vector of d entries)::

    F_hat = lambda I + (1/m) sum_{i = 1..m} g_i g_i^T            (the window g_1..g_m, newest last)
    u     = F_hat^{-1} (g + wd theta)                            (g + wd theta enters the window first)
    v     <- mu v + (1 - mu) u    (optional momentum, after preconditioning)
    theta <- theta - lr v

The product is matrix-free in d. With the window's m x d matrix G and its Gram matrix
K = G G^T, Woodbury's identity gives::

    F_hat^{-1} x = (1 / lambda) (x - G^T (m lambda I + K)^{-1} G x)

Each step replaces the oldest row of G, updates one row and column of K (G g: O(d m)), factors
m lambda I + K (Cholesky in float64, O(m^3)), and takes G x and G^T c (O(d m)). The paper's own
algorithm reaches O(d m + m^2) per product by updating its coefficients recursively; this
writes the same F_hat^{-1} with a fresh factorisation each step, which is simpler and, for the
m <= 1024 of the paper, small beside the O(d m) products. Unfilled rows of the window are zero,
as in the official code (IST-DASLab/M-FAC): the first steps divide by m, not by the count.
Defaults follow that code: m = 1024, lambda = 1e-5, lr 1e-3. The window is float32 (float64 for
float64 parameters): m x d numbers, 4 m bytes per parameter. With lambda = 1e-5 the subtraction
in the identity cancels for a vector inside the window's span, so in float32 such a component
of the step carries a relative error near eps_32 / lambda (~1e-2), as in the official code; the
component outside the span, scaled by 1 / lambda, dominates a real step.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.tensor([3.0, -1.0], dtype=torch.float64))
    >>> opt = MFAC([w], lr=1.0, ngrads=2, damp=1e-5)
    >>> loss = (w ** 2).sum(); loss.backward(); opt.step()
    >>> # one gradient g = 2 w: F_hat^{-1} g = g / (lambda + |g|^2 / m), about m / |g|^2 times g
    >>> torch.allclose(w.detach(), torch.tensor([3.0, -1.0], dtype=torch.float64) * (1 - 2 / (1e-5 + 40 / 2)))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from nograd.optim._common import call_closure


class MFAC(torch.optim.Optimizer):
    """Inverse-empirical-Fisher preconditioning from a sliding window of the last ``ngrads`` gradients."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        ngrads: int = 1024,
        damp: float = 1e-5,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0 or weight_decay < 0 or ngrads < 1 or not damp > 0:
            raise ValueError("momentum must be in [0, 1), weight_decay >= 0, ngrads >= 1, damp > 0")
        super().__init__(params, dict(lr=lr))
        self.momentum, self.weight_decay, self.ngrads, self.damp = momentum, weight_decay, ngrads, damp
        self.window: dict[str, Any] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _window(self, like: torch.Tensor) -> dict:
        # One estimator for all parameters, kept apart from the per-parameter state: torch's
        # load_state_dict would cast the float64 Gram matrix to the parameters' dtype.
        state = self.window
        if not state:
            d = sum(p.numel() for p in self._params())
            state["grads"] = torch.zeros(self.ngrads, d, dtype=like.dtype, device=like.device)
            state["gram"] = torch.zeros(self.ngrads, self.ngrads, dtype=torch.float64, device=like.device)
            state["next"] = 0  # the ring buffer's oldest row
            if self.momentum:
                state["velocity"] = torch.zeros(d, dtype=like.dtype, device=like.device)
        return state

    def inverse_fisher_product(self, x: torch.Tensor) -> torch.Tensor:
        """``F_hat^{-1} x`` for the current window (Woodbury, see the module docstring)."""
        state = self._window(x)
        G, K, m, lam = state["grads"], state["gram"], self.ngrads, self.damp
        system = K + m * lam * torch.eye(m, dtype=K.dtype, device=K.device)
        c = torch.cholesky_solve((G @ x).double().unsqueeze(1), torch.linalg.cholesky(system))
        return (x - G.T @ c.squeeze(1).to(G.dtype)) / lam

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "window": dict(self.window)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        window = state_dict.pop("window", {})
        super().load_state_dict(state_dict)
        device = self._params()[0].device
        self.window = {k: v.to(device) if torch.is_tensor(v) else v for k, v in window.items()}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = call_closure(closure)
        params = self._params()
        if any(p.grad is None for p in params):
            raise ValueError("M-FAC preconditions all parameters at once: every one needs a .grad")
        dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        g = torch.cat([p.grad.reshape(-1) for p in params]).to(dtype)
        if self.weight_decay:
            g.add_(torch.cat([p.reshape(-1) for p in params]).to(dtype), alpha=self.weight_decay)
        state = self._window(g)
        G, K, row = state["grads"], state["gram"], state["next"]
        G[row] = g
        dots = (G @ g).double()
        K[row, :], K[:, row] = dots, dots
        state["next"] = (row + 1) % self.ngrads
        u = self.inverse_fisher_product(g)
        if self.momentum:
            u = state["velocity"].mul_(self.momentum).add_(u, alpha=1 - self.momentum)
        offset = 0
        for group in self.param_groups:
            for p in group["params"]:
                n = p.numel()
                p.add_(u[offset : offset + n].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += n
        return loss
