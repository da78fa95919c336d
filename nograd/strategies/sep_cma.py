"""sep-CMA-ES: CMA-ES with a diagonal covariance matrix, linear time and space per sample.

Ros & Hansen (2008), "A Simple Modification in CMA-ES Achieving Linear Time and Space Complexity"
(PPSN X). ``C`` is restricted to its diagonal ``c`` (the update below is the diagonal of the
full CMA-ES update), which lets the covariance learning rates grow by the factor ``(n + 2) / 3``::

    c_1' = c_1 (n + 2) / 3,      c_μ' = min(1 - c_1', c_μ (n + 2) / 3)

with ``c_1, c_μ, c_c, c_σ, d_σ``, ``λ = 4 + floor(3 ln n)``, ``μ = floor(λ/2)`` and the positive log
weights ``w_i`` of Hansen's tutorial (arXiv:1604.00772, Table 1; see :mod:`nograd.strategies.cma`).
No negative weights (as in the paper). One generation, ``z_k ~ N(0, I)``, ``d = sqrt(c)``::

    x_k = m + σ d ⊙ z_k
    <z>_w = Σ_{i<=μ} w_i z_{i:λ},   <y>_w = d ⊙ <z>_w,   m <- m + c_m σ <y>_w
    p_σ <- (1 - c_σ) p_σ + sqrt(c_σ (2 - c_σ) μ_eff) <z>_w          (C^{-1/2} <y>_w = <z>_w)
    σ  <- σ exp((c_σ/d_σ)(||p_σ|| / E||N(0,I)|| - 1))
    h_σ, δ(h_σ) as in CMA-ES;  p_c <- (1 - c_c) p_c + h_σ sqrt(c_c (2 - c_c) μ_eff) <y>_w
    c <- (1 + c_1' δ(h_σ) - c_1' - c_μ') c + c_1' p_c^2 + c_μ' c ⊙ Σ_{i<=μ} w_i z_{i:λ}^2

``tell`` only needs ``Σ w_i z_i`` and ``Σ w_i z_i^2`` over the μ best, regenerated from seeds in
chunks, so nothing of size ``λ x n`` is needed.

Example:
    >>> from nograd.strategies.functions import separable_ellipsoid
    >>> es = SepCMAES([1.0] * 20, sigma=1.0, seed=0)
    >>> x, f = es.optimize(separable_ellipsoid, max_evals=30000, target=1e-8)
    >>> f <= 1e-8
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from nograd.strategies.base import F64, Strategy, _check_range, expected_norm
from nograd.strategies.cma import cma_parameters

__all__ = ["SepCMAES"]

Tensor = torch.Tensor


class SepCMAES(Strategy):
    """Separable (diagonal) CMA-ES with CSA step size (Ros & Hansen 2008).

    Args:
        x0, sigma, popsize, seed: see :class:`~nograd.strategies.base.Strategy`.
        c_sigma, d_sigma, c_c: override the CMA-ES defaults.
        c_1, c_mu: override the *already scaled* diagonal learning rates ``c_1'``, ``c_μ'``.
        c_m: learning rate of the mean (1).
    """

    name = "sep-cma"
    float32_samples = True
    table_in_place = True
    _state_keys = (
        "diag_c",
        "p_sigma",
        "p_c",
        "weights",
        "mu",
        "mu_eff",
        "c_sigma",
        "d_sigma",
        "c_c",
        "c_1",
        "c_mu",
        "c_m",
    )

    def __init__(
        self,
        x0: Tensor | Sequence[float],
        sigma: float,
        popsize: int | None = None,
        seed: int = 0,
        noise: str = "gaussian",
        *,
        c_sigma: float | None = None,
        d_sigma: float | None = None,
        c_c: float | None = None,
        c_1: float | None = None,
        c_mu: float | None = None,
        c_m: float = 1.0,
    ) -> None:
        super().__init__(x0, sigma, popsize, seed, noise=noise)
        n = self.dim
        p = cma_parameters(n, self.popsize, active=False, c_sigma=c_sigma, d_sigma=d_sigma, c_c=c_c)
        boost = (n + 2) / 3
        c1 = p["c_1"] * boost if c_1 is None else float(c_1)
        cmu = min(1 - c1, p["c_mu"] * boost) if c_mu is None else float(c_mu)
        self.mu: int = p["mu"]
        self.weights: Tensor = p["weights"][: self.mu].clone()
        self.mu_eff: float = p["mu_eff"]
        self.c_sigma = _check_range("c_sigma", p["c_sigma"], 0.0, 1.0, lo_open=True)
        self.d_sigma = _check_range("d_sigma", p["d_sigma"], 0.0, math.inf, lo_open=True)
        self.c_c = _check_range("c_c", p["c_c"], 0.0, 1.0)
        self.c_1 = _check_range("c_1", c1, 0.0, 1.0)
        self.c_mu = _check_range("c_mu", cmu, 0.0, 1.0)
        if self.c_1 + self.c_mu > 1:
            raise ValueError(f"c_1 + c_mu must be <= 1, got {self.c_1} + {self.c_mu}")
        self.c_m = _check_range("c_m", c_m, 0.0, 1.0, lo_open=True)
        self.diag_c: Tensor = torch.ones(n, dtype=F64)
        self.p_sigma: Tensor = torch.zeros(n, dtype=F64)
        self.p_c: Tensor = torch.zeros(n, dtype=F64)
        self.chi_n = expected_norm(n)

    def _candidates(self, members: Sequence[int]) -> Tensor:
        return self._affine_samples(members, self.mean, self.sigma * self.diag_c.sqrt())

    def _update(self, losses: Tensor, order: Tensor) -> None:
        n, cs, cc, c1, cmu = self.dim, self.c_sigma, self.c_c, self.c_1, self.c_mu
        selected = order[: self.mu].tolist()
        z_w, zz_w = self._weighted_sums(selected, self.weights, self.weights)
        d = self.diag_c.sqrt()
        y_w = d * z_w
        mean = self.mean + self.c_m * self.sigma * y_w
        p_sigma = (1 - cs) * self.p_sigma + math.sqrt(cs * (2 - cs) * self.mu_eff) * z_w
        norm_ps = float(p_sigma.norm())
        g = self.generation
        h_sigma = float(norm_ps / math.sqrt(1 - (1 - cs) ** (2 * (g + 1))) < (1.4 + 2 / (n + 1)) * self.chi_n)
        p_c = (1 - cc) * self.p_c + h_sigma * math.sqrt(cc * (2 - cc) * self.mu_eff) * y_w
        delta = (1 - h_sigma) * cc * (2 - cc)
        diag_c = (1 + c1 * delta - c1 - cmu * float(self.weights.sum())) * self.diag_c
        diag_c = diag_c + c1 * p_c.square() + cmu * self.diag_c * zz_w
        self.sigma = self.sigma * math.exp((cs / self.d_sigma) * (norm_ps / self.chi_n - 1))
        self.mean, self.p_sigma, self.p_c, self.diag_c = mean, p_sigma, p_c, diag_c

    def _max_std(self) -> float:
        return self.sigma * max(float(self.diag_c.sqrt().max()), float(self.p_c.abs().max()))

    def _stop_extra(self) -> dict[str, Any]:
        out: dict[str, float] = {}
        cond = float(self.diag_c.max() / self.diag_c.min())
        if cond > 1e14:
            out["conditioncov"] = cond
        if bool((self.mean == self.mean + 0.2 * self.sigma * self.diag_c.sqrt()).any()):
            out["noeffectcoord"] = 1.0
        return out
