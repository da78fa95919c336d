"""PGPE with symmetric sampling, centered-rank fitness shaping and the ClipUp optimizer.

Sehnke, Osendorfer, Rückstieß, Graves, Peters & Schmidhuber (2010), "Parameter-exploring policy
gradients", Neural Networks 23(4) (with symmetric sampling); Toklu, Liskowski & Srivastava
(2020), "ClipUp: a simple and powerful optimizer for distribution-based policy evolution" (PPSN XVI).

Symmetric sampling draws ``P = λ/2`` perturbations ``ε_k = σ ⊙ z_k`` and evaluates the pair
``μ + ε_k`` (member ``2k``) and ``μ - ε_k`` (member ``2k+1``, see :func:`nograd.core.noise.mirrored`).
Losses are turned into centered ranks ``u ∈ [-0.5, 0.5]`` (worst = +0.5), and with
``u_k^± `` the utilities of the pair and ``b`` their mean (baseline)::

    g_μ = (1/P) Σ_k (u_k^+ - u_k^-)/2 · ε_k                       (loss gradient wrt μ)
    g_σ = (1/P) Σ_k ((u_k^+ + u_k^-)/2 - b) · (ε_k^2 - σ^2) / σ    (loss gradient wrt σ)

ClipUp step on the mean (descending the loss)::

    v <- m v + α g_μ / ||g_μ||,     v <- v · min(1, v_max / ||v||),     μ <- μ - v
    defaults: m = 0.9 (momentum), α = v_max / 2

and a plain gradient step on the standard deviations, each clipped to a relative change of at
most ``stdev_max_change`` per generation (a common PGPE safeguard; ``None`` disables it)::

    σ <- clip(σ - η_σ g_σ,  (1 - c) σ,  (1 + c) σ),     η_σ = 0.1,  c = 0.2

``max_speed`` defaults to ``||σ_0|| / 15 = sigma sqrt(n) / 15`` (a heuristic, the radius of the
initial search distribution over 15): it is the main knob to tune.

Example:
    >>> from nograd.strategies.functions import sphere
    >>> es = PGPE([1.0] * 100, sigma=0.3, popsize=50, seed=0)
    >>> x, f = es.optimize(sphere, max_evals=20000)
    >>> f < 1.0
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from nograd.core.noise import mirrored
from nograd.core.shaping import centered_ranks
from nograd.strategies.base import F64, DiagonalStd, Strategy, _check_range, default_popsize

__all__ = ["PGPE"]

Tensor = torch.Tensor


class PGPE(DiagonalStd, Strategy):
    """PGPE (Sehnke et al. 2010) with symmetric sampling and ClipUp (Toklu et al. 2020).

    Args:
        x0, sigma, popsize, seed: see :class:`~nograd.strategies.base.Strategy`; ``popsize`` must be
            even (mirrored pairs), default ``4 + floor(3 ln n)`` rounded up to even.
        max_speed: ClipUp's maximum speed ``v_max`` (default ``sigma sqrt(n) / 15``).
        step_size: ClipUp's step size ``α`` (default ``max_speed / 2``).
        momentum: ClipUp's momentum (0.9).
        stdev_lr: learning rate ``η_σ`` of the standard deviations (0.1).
        stdev_max_change: bound on the relative change of σ per generation (0.2; ``None``: off).
    """

    name = "pgpe"
    float32_samples = True
    table_in_place = True
    _state_keys = ("stdev", "velocity", "max_speed", "step_size", "momentum", "stdev_lr", "stdev_max_change")

    def __init__(
        self,
        x0: Tensor | Sequence[float],
        sigma: float,
        popsize: int | None = None,
        seed: int = 0,
        noise: str = "gaussian",
        *,
        max_speed: float | None = None,
        step_size: float | None = None,
        momentum: float = 0.9,
        stdev_lr: float = 0.1,
        stdev_max_change: float | None = 0.2,
    ) -> None:
        super().__init__(x0, sigma, popsize, seed, noise=noise)
        if self.popsize % 2:
            raise ValueError(f"PGPE samples mirrored pairs: popsize must be even, got {self.popsize}")
        vmax = float(sigma) * math.sqrt(self.dim) / 15 if max_speed is None else max_speed
        self.max_speed = _check_range("max_speed", vmax, 0.0, math.inf, lo_open=True)
        self.step_size = _check_range(
            "step_size", self.max_speed / 2 if step_size is None else step_size, 0.0, math.inf, lo_open=True
        )
        self.momentum = _check_range("momentum", momentum, 0.0, 1.0)
        if self.momentum == 1.0:
            raise ValueError("momentum must be < 1")
        self.stdev_lr = _check_range("stdev_lr", stdev_lr, 0.0, math.inf)
        self.stdev_max_change = (
            None
            if stdev_max_change is None
            else _check_range("stdev_max_change", stdev_max_change, 0, 1, True)
        )
        self.velocity: Tensor = torch.zeros(self.dim, dtype=F64)

    def default_popsize(self, dim: int) -> int:
        lam = default_popsize(dim)
        return lam + lam % 2

    @property
    def _n_noise(self) -> int:
        return self.popsize // 2

    def _candidates(self, members: Sequence[int]) -> Tensor:
        pairs = [mirrored(int(i)) for i in members]
        return self._affine_samples([k for k, _ in pairs], self.mean, self.stdev, [s for _, s in pairs])

    def _update(self, losses: Tensor, order: Tensor) -> None:
        u = centered_ranks(losses)
        u_plus, u_minus = u[0::2], u[1::2]
        n_pairs = self._n_noise
        a = (u_plus - u_minus) / 2
        b = (u_plus + u_minus) / 2 - u.mean()
        sum_a_z, sum_b_z2 = self._weighted_sums(range(n_pairs), a, b)
        grad_mu = self.stdev * sum_a_z / n_pairs  # (1/P) Σ a_k ε_k
        grad_sigma = self.stdev * (sum_b_z2 - float(b.sum())) / n_pairs  # (1/P) Σ b_k (ε^2 - σ^2)/σ
        norm = float(grad_mu.norm())
        velocity = self.momentum * self.velocity
        if norm > 0:
            velocity = velocity + (self.step_size / norm) * grad_mu
        speed = float(velocity.norm())
        if speed > self.max_speed:
            velocity = velocity * (self.max_speed / speed)
        stdev = self.stdev - self.stdev_lr * grad_sigma
        if self.stdev_max_change is not None:
            c = self.stdev_max_change
            stdev = torch.minimum(torch.maximum(stdev, (1 - c) * self.stdev), (1 + c) * self.stdev)
        self.stdev = stdev.clamp_min(torch.finfo(F64).tiny)
        self.velocity = velocity
        self.mean = self.mean - velocity
