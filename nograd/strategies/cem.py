"""Cross-Entropy Method with a diagonal Gaussian, smoothed updates and an optional noise floor.

De Boer, Kroese, Mannor & Rubinstein (2005), "A Tutorial on the Cross-Entropy Method", Annals of
Operations Research 134:19-67 (continuous optimization with normal sampling and smoothed updating);
extra noise after Szita & Lőrincz (2006), "Learning Tetris Using the Noisy Cross-Entropy Method",
Neural Computation 18(12), where a decreasing ``Z_t`` is added to the variance to prevent premature
collapse::

    x_k = μ + σ ⊙ z_k,   z_k ~ N(0, I),   k = 1..λ
    E = the ρλ (at least 2) lowest-loss samples ("elites")
    μ̂ = mean_{x∈E} x,    σ̂^2 = var_{x∈E} x   (per coordinate, around μ̂)
    Z_t = max(extra_noise - extra_noise_decay · t, 0)
    μ <- (1 - α) μ + α μ̂
    σ^2 <- (1 - α) σ^2 + α (σ̂^2 + Z_t),      then σ <- max(σ, min_stdev)

Defaults: ``ρ = 0.25`` (``elite_frac``), ``α = 0.7`` (``smoothing``, inside the 0.4-0.9 range De Boer
et al. recommend), no extra noise. Because ``μ̂ = μ + σ ⊙ mean(z_E)`` and
``σ̂^2 = σ^2 ⊙ (mean(z_E^2) - mean(z_E)^2)``, ``tell`` only regenerates the elites' ``z`` from seeds.

Example:
    >>> from nograd.strategies.functions import sphere
    >>> es = CEM([1.0] * 10, sigma=0.5, popsize=40, seed=0, extra_noise=0.01, extra_noise_decay=2e-4)
    >>> x, f = es.optimize(sphere, max_evals=20000, target=1e-8)
    >>> f <= 1e-8
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from nograd.strategies.base import DiagonalStd, Strategy, _check_range

__all__ = ["CEM"]

Tensor = torch.Tensor


class CEM(DiagonalStd, Strategy):
    """Cross-entropy method (De Boer et al. 2005) on a diagonal Gaussian.

    Args:
        x0, sigma, popsize, seed: see :class:`~nograd.strategies.base.Strategy`.
        elite_frac: fraction ``ρ`` of the population kept as elites (at least 2 are kept).
        smoothing: ``α`` in (0, 1], weight of the new estimate (1 = no smoothing).
        extra_noise: ``Z_0``, variance added to every coordinate (Szita & Lőrincz 2006).
        extra_noise_decay: linear decrease of ``Z_t`` per generation.
        min_stdev: floor on every coordinate's standard deviation.
    """

    name = "cem"
    float32_samples = True
    table_in_place = True
    _state_keys = ("stdev", "n_elite", "smoothing", "extra_noise", "extra_noise_decay", "min_stdev")
    min_popsize = 3

    def __init__(
        self,
        x0: Tensor | Sequence[float],
        sigma: float,
        popsize: int | None = None,
        seed: int = 0,
        noise: str = "gaussian",
        *,
        elite_frac: float = 0.25,
        smoothing: float = 0.7,
        extra_noise: float = 0.0,
        extra_noise_decay: float = 0.0,
        min_stdev: float = 0.0,
    ) -> None:
        super().__init__(x0, sigma, popsize, seed, noise=noise)
        frac = _check_range("elite_frac", elite_frac, 0.0, 1.0, lo_open=True)
        self.n_elite: int = max(2, int(round(frac * self.popsize)))
        if self.n_elite >= self.popsize:
            raise ValueError(f"elite_frac={elite_frac} keeps all {self.popsize} samples; lower it")
        self.smoothing = _check_range("smoothing", smoothing, 0.0, 1.0, lo_open=True)
        self.extra_noise = _check_range("extra_noise", extra_noise, 0.0, math.inf)
        self.extra_noise_decay = _check_range("extra_noise_decay", extra_noise_decay, 0.0, math.inf)
        self.min_stdev = _check_range("min_stdev", min_stdev, 0.0, math.inf)

    def _candidates(self, members: Sequence[int]) -> Tensor:
        return self._affine_samples(members, self.mean, self.stdev)

    def _update(self, losses: Tensor, order: Tensor) -> None:
        elites = order[: self.n_elite].tolist()
        w = torch.full((self.n_elite,), 1.0 / self.n_elite, dtype=torch.float64)
        mean_z, mean_z2 = self._weighted_sums(elites, w, w)
        elite_mean = self.mean + self.stdev * mean_z
        elite_var = self.stdev.square() * (mean_z2 - mean_z.square()).clamp_min(0)
        z_t = max(self.extra_noise - self.extra_noise_decay * self.generation, 0.0)
        a = self.smoothing
        self.mean = (1 - a) * self.mean + a * elite_mean
        var = (1 - a) * self.stdev.square() + a * (elite_var + z_t)
        self.stdev = var.sqrt().clamp_min(max(self.min_stdev, torch.finfo(torch.float64).tiny))
