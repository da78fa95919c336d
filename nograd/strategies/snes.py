"""SNES: separable natural evolution strategy (diagonal Gaussian, natural-gradient updates).

Schaul, Glasmachers & Schmidhuber (2011), "High Dimensions and Heavy Tails for Natural Evolution
Strategies" (GECCO): SNES with the paper's default parameters::

    λ = 4 + floor(3 ln n),   η_μ = 1,   η_σ = (3 + ln n) / (5 sqrt(n))
    utilities (rank k = 1 is the lowest loss):
    u_k = max(0, ln(λ/2 + 1) - ln k) / Σ_j max(0, ln(λ/2 + 1) - ln j)  -  1/λ

    s_k ~ N(0, I),   z_k = μ + σ ⊙ s_k
    ∇_μ J = Σ_k u_k s_k,           ∇_σ J = Σ_k u_k (s_k^2 - 1)
    μ <- μ + η_μ σ ⊙ ∇_μ J,         σ <- σ ⊙ exp(η_σ / 2 ∇_σ J)

The utilities are rank-based (fitness shaping), so only the order of the losses matters. ``tell``
regenerates the samples from seeds in chunks to form the two weighted sums.

Example:
    >>> from nograd.strategies.functions import sphere
    >>> es = SNES([1.0] * 100, sigma=0.5, seed=0)
    >>> x, f = es.optimize(sphere, max_evals=50000, target=1e-6)
    >>> f <= 1e-6
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from nograd.strategies.base import F64, DiagonalStd, Strategy, _check_range

__all__ = ["SNES", "snes_utilities"]

Tensor = torch.Tensor


def snes_utilities(popsize: int) -> Tensor:
    """NES utilities ``u_k`` for ranks ``k = 1..λ`` (best first); they sum to zero."""
    k = torch.arange(1, popsize + 1, dtype=F64)
    raw = (math.log(popsize / 2 + 1) - torch.log(k)).clamp_min(0)
    return raw / raw.sum() - 1 / popsize


class SNES(DiagonalStd, Strategy):
    """Separable NES (Schaul et al. 2011).

    Args:
        x0, sigma, popsize, seed: see :class:`~nograd.strategies.base.Strategy`; ``sigma`` is the
            initial value of every coordinate's standard deviation ``stdev``.
        eta_mu: learning rate of the mean (1).
        eta_sigma: learning rate of the log standard deviations (default ``(3 + ln n) / (5 sqrt n)``).
    """

    name = "snes"
    float32_samples = True
    table_in_place = True
    _state_keys = ("stdev", "utilities", "eta_mu", "eta_sigma")

    def __init__(
        self,
        x0: Tensor | Sequence[float],
        sigma: float,
        popsize: int | None = None,
        seed: int = 0,
        noise: str = "gaussian",
        *,
        eta_mu: float = 1.0,
        eta_sigma: float | None = None,
    ) -> None:
        super().__init__(x0, sigma, popsize, seed, noise=noise)
        n = self.dim
        self.eta_mu = _check_range("eta_mu", eta_mu, 0.0, math.inf, lo_open=True)
        eta_s = (3 + math.log(n)) / (5 * math.sqrt(n)) if eta_sigma is None else eta_sigma
        self.eta_sigma = _check_range("eta_sigma", eta_s, 0.0, math.inf)
        self.utilities: Tensor = snes_utilities(self.popsize)

    def _candidates(self, members: Sequence[int]) -> Tensor:
        return self._affine_samples(members, self.mean, self.stdev)

    def _update(self, losses: Tensor, order: Tensor) -> None:
        u = self.utilities  # u[k] belongs to member order[k]
        grad_mu, sum_u_s2 = self._weighted_sums(order.tolist(), u, u)
        grad_sigma = sum_u_s2 - float(u.sum())
        self.mean = self.mean + self.eta_mu * self.stdev * grad_mu
        self.stdev = self.stdev * torch.exp(self.eta_sigma / 2 * grad_sigma)
