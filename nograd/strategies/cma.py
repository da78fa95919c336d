"""Full-covariance CMA-ES (Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772).

Sampling (tutorial, Section 1 and Appendix A), with ``C = B D^2 B^T`` and fresh ``z_k ~ N(0, I)``::

    y_k = B D z_k,   x_k = m + sigma y_k,   k = 1..λ

Default parameters (tutorial, Table 1; ``n = dim``)::

    λ = 4 + floor(3 ln n),  μ = floor(λ/2)
    w'_i = ln((λ+1)/2) - ln i                                  i = 1..λ
    μ_eff = (Σ_{i<=μ} w'_i)^2 / Σ_{i<=μ} w'_i^2,  μ_eff^- likewise over the negative w'_i
    c_σ = (μ_eff + 2) / (n + μ_eff + 5)
    d_σ = 1 + 2 max(0, sqrt((μ_eff - 1)/(n + 1)) - 1) + c_σ
    c_c = (4 + μ_eff/n) / (n + 4 + 2 μ_eff/n)
    c_1 = α_cov / ((n + 1.3)^2 + μ_eff),                       α_cov = 2
    c_μ = min(1 - c_1, α_cov (1/4 + μ_eff + 1/μ_eff - 2) / ((n + 2)^2 + α_cov μ_eff / 2))
    w_i = w'_i / Σ|w'_j|^+                                     if w'_i >= 0
    w_i = min(1 + c_1/c_μ, 1 + 2 μ_eff^-/(μ_eff + 2), (1 - c_1 - c_μ)/(n c_μ)) w'_i / Σ|w'_j|^-   else

(the 1/4 in c_μ is the offset pycma uses as well; pycma's c_σ has ``+3`` where the tutorial has ``+5``.)
With ``active=False`` the negative weights are zeroed (the non-active, rank-μ-only variant).

Update of one generation (tutorial, Appendix A, "Algorithm Summary"), ``y_{i:λ}`` sorted by loss::

    <y>_w = Σ_{i<=μ} w_i y_{i:λ};                 m <- m + c_m σ <y>_w
    p_σ <- (1 - c_σ) p_σ + sqrt(c_σ (2 - c_σ) μ_eff) C^{-1/2} <y>_w       (C^{-1/2} y_k = B z_k)
    σ  <- σ exp((c_σ/d_σ) (||p_σ|| / E||N(0,I)|| - 1))
    h_σ = 1 if ||p_σ|| / sqrt(1 - (1 - c_σ)^{2(g+1)}) < (1.4 + 2/(n+1)) E||N(0,I)|| else 0
    p_c <- (1 - c_c) p_c + h_σ sqrt(c_c (2 - c_c) μ_eff) <y>_w
    w°_i = w_i (1 if w_i >= 0 else n / ||C^{-1/2} y_{i:λ}||^2)
    δ(h_σ) = (1 - h_σ) c_c (2 - c_c)
    C <- (1 + c_1 δ(h_σ) - c_1 - c_μ Σ_j w_j) C + c_1 p_c p_c^T + c_μ Σ_i w°_i y_{i:λ} y_{i:λ}^T

The eigendecomposition ``C = B D^2 B^T`` is refreshed lazily, every
``max(1, floor(1 / (10 n (c_1 + c_μ))))`` generations (tutorial, Appendix B.2), so a generation costs
O(n^2 λ). Memory is O(n^2): beyond ``max_dim`` (default 2000) use sep-CMA-ES or LM-MA-ES.

Example:
    >>> from nograd.strategies.functions import ellipsoid
    >>> es = CMAES(torch.ones(8, dtype=torch.float64), sigma=1.0, seed=0)
    >>> x, f = es.optimize(ellipsoid, max_evals=20000, target=1e-8)
    >>> f <= 1e-8
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from nograd.strategies.base import F64, Strategy, _check_range, expected_norm

__all__ = ["CMAES", "cma_parameters"]

Tensor = torch.Tensor


def cma_parameters(
    dim: int,
    popsize: int,
    active: bool = True,
    c_sigma: float | None = None,
    d_sigma: float | None = None,
    c_c: float | None = None,
    c_1: float | None = None,
    c_mu: float | None = None,
) -> dict[str, Any]:
    """Default CMA-ES constants of the tutorial's Table 1 (see the module docstring)."""
    n, lam = dim, popsize
    mu = lam // 2
    i = torch.arange(1, lam + 1, dtype=F64)
    wp = math.log((lam + 1) / 2) - torch.log(i)
    pos, neg = wp > 0, wp < 0
    mu_eff = float(wp[pos].sum() ** 2 / wp[pos].square().sum())
    mu_eff_minus = float(wp[neg].sum() ** 2 / wp[neg].square().sum()) if neg.any() else 0.0
    alpha_cov = 2.0
    cs = (mu_eff + 2) / (n + mu_eff + 5) if c_sigma is None else float(c_sigma)
    ds = 1 + 2 * max(0.0, math.sqrt((mu_eff - 1) / (n + 1)) - 1) + cs if d_sigma is None else float(d_sigma)
    cc = (4 + mu_eff / n) / (n + 4 + 2 * mu_eff / n) if c_c is None else float(c_c)
    c1 = alpha_cov / ((n + 1.3) ** 2 + mu_eff) if c_1 is None else float(c_1)
    if c_mu is None:
        c_mu = min(
            1 - c1, alpha_cov * (0.25 + mu_eff + 1 / mu_eff - 2) / ((n + 2) ** 2 + alpha_cov * mu_eff / 2)
        )
    cmu = float(c_mu)
    w = torch.zeros(lam, dtype=F64)
    w[pos] = wp[pos] / wp[pos].sum()
    if active and neg.any() and cmu > 0:
        alpha_mu = 1 + c1 / cmu
        alpha_mueff = 1 + 2 * mu_eff_minus / (mu_eff + 2)
        alpha_posdef = (1 - c1 - cmu) / (n * cmu)
        w[neg] = min(alpha_mu, alpha_mueff, alpha_posdef) * wp[neg] / wp[neg].abs().sum()
    return {
        "mu": mu,
        "weights": w,
        "mu_eff": mu_eff,
        "c_sigma": cs,
        "d_sigma": ds,
        "c_c": cc,
        "c_1": c1,
        "c_mu": cmu,
    }


class CMAES(Strategy):
    """(μ/μ_W, λ)-CMA-ES with full covariance, CSA step size and (by default) active negative weights.

    Args:
        x0, sigma, popsize, seed: see :class:`~nograd.strategies.base.Strategy`.
        active: use the tutorial's negative recombination weights (active CMA, as pycma's default).
        c_sigma, d_sigma, c_c, c_1, c_mu: override the Table-1 defaults.
        c_m: learning rate of the mean (1).
        max_dim: refuse larger problems (O(n^2) memory, O(n^3) eigendecompositions).
    """

    name = "cma"
    _state_keys = (
        "C",
        "B",
        "D",
        "p_sigma",
        "p_c",
        "eigen_generation",
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
    # the whole generation's samples are needed by the rank-μ update: always cache them
    cache_elements = 1 << 62

    def __init__(
        self,
        x0: Tensor | Sequence[float],
        sigma: float,
        popsize: int | None = None,
        seed: int = 0,
        noise: str = "gaussian",
        *,
        active: bool = True,
        c_sigma: float | None = None,
        d_sigma: float | None = None,
        c_c: float | None = None,
        c_1: float | None = None,
        c_mu: float | None = None,
        c_m: float = 1.0,
        max_dim: int = 2000,
    ) -> None:
        n = torch.as_tensor(x0).numel()
        if n > max_dim:
            raise ValueError(
                f"full CMA-ES stores a {n}x{n} covariance matrix; dim={n} exceeds max_dim={max_dim}. "
                "Use SepCMAES ('sep-cma'), LMMAES ('lm-ma-es') or RmES ('rm-es') for large problems, "
                "or pass a larger max_dim."
            )
        super().__init__(x0, sigma, popsize, seed, noise=noise)
        p = cma_parameters(self.dim, self.popsize, active, c_sigma, d_sigma, c_c, c_1, c_mu)
        self.active = bool(active)
        self.mu: int = p["mu"]
        self.weights: Tensor = p["weights"]
        self.mu_eff: float = p["mu_eff"]
        self.c_sigma = _check_range("c_sigma", p["c_sigma"], 0.0, 1.0, lo_open=True)
        self.d_sigma = _check_range("d_sigma", p["d_sigma"], 0.0, math.inf, lo_open=True)
        self.c_c = _check_range("c_c", p["c_c"], 0.0, 1.0)
        self.c_1 = _check_range("c_1", p["c_1"], 0.0, 1.0)
        self.c_mu = _check_range("c_mu", p["c_mu"], 0.0, 1.0)
        if self.c_1 + self.c_mu > 1:
            raise ValueError(f"c_1 + c_mu must be <= 1, got {self.c_1} + {self.c_mu}")
        self.c_m = _check_range("c_m", c_m, 0.0, 1.0, lo_open=True)
        n = self.dim
        self.C: Tensor = torch.eye(n, dtype=F64)
        self.B: Tensor = torch.eye(n, dtype=F64)
        self.D: Tensor = torch.ones(n, dtype=F64)
        self.p_sigma: Tensor = torch.zeros(n, dtype=F64)
        self.p_c: Tensor = torch.zeros(n, dtype=F64)
        self.eigen_generation: int = 0
        self.chi_n = expected_norm(n)
        self._bd = self.B * self.D

    @property
    def eigen_gap(self) -> int:
        """Generations between eigendecompositions: ``max(1, floor(1/(10 n (c_1 + c_μ))))``."""
        rate = self.c_1 + self.c_mu
        return 1 if rate <= 0 else max(1, int(1 / (10 * self.dim * rate)))

    def _candidates(self, members: Sequence[int]) -> Tensor:
        z = self.standard_normal(members)
        return self.mean + self.sigma * (z @ self._bd.T)

    def _update(self, losses: Tensor, order: Tensor) -> None:
        n, mu, w = self.dim, self.mu, self.weights
        cs, cc, c1, cmu = self.c_sigma, self.c_c, self.c_1, self.c_mu
        z = self.standard_normal()[order]  # z_{i:λ}
        y = z @ self._bd.T  # y_{i:λ} = B D z_{i:λ}
        z_w = w[:mu] @ z[:mu]
        y_w = w[:mu] @ y[:mu]
        mean = self.mean + self.c_m * self.sigma * y_w
        p_sigma = (1 - cs) * self.p_sigma + math.sqrt(cs * (2 - cs) * self.mu_eff) * (self.B @ z_w)
        norm_ps = float(p_sigma.norm())
        g = self.generation
        h_sigma = float(norm_ps / math.sqrt(1 - (1 - cs) ** (2 * (g + 1))) < (1.4 + 2 / (n + 1)) * self.chi_n)
        p_c = (1 - cc) * self.p_c + h_sigma * math.sqrt(cc * (2 - cc) * self.mu_eff) * y_w
        w_circ = w.clone()
        negative = w < 0
        if negative.any():
            w_circ[negative] = w[negative] * n / z[negative].square().sum(1).clamp_min(1e-300)
        delta = (1 - h_sigma) * cc * (2 - cc)
        C = (1 + c1 * delta - c1 - cmu * float(w.sum())) * self.C
        C = C + c1 * torch.outer(p_c, p_c) + cmu * (y.T * w_circ) @ y
        sigma = self.sigma * math.exp((cs / self.d_sigma) * (norm_ps / self.chi_n - 1))
        self.mean, self.p_sigma, self.p_c, self.C, self.sigma = mean, p_sigma, p_c, C, sigma
        if g + 1 - self.eigen_generation >= self.eigen_gap:
            self._eigen(g + 1)

    def _eigen(self, generation: int) -> None:
        C = (self.C + self.C.T) / 2
        evals, evecs = torch.linalg.eigh(C)
        tiny = max(float(evals.max()), 1e-300) * 1e-20
        self.C = C
        self.B = evecs
        self.D = evals.clamp_min(tiny).sqrt()
        self.eigen_generation = generation
        self._bd = self.B * self.D

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._bd = self.B * self.D

    def _max_std(self) -> float:
        return self.sigma * max(float(self.C.diagonal().sqrt().max()), float(self.p_c.abs().max()))

    def _stop_extra(self) -> dict[str, float]:
        out: dict[str, float] = {}
        cond = float((self.D.max() / self.D.min()) ** 2)
        if cond > 1e14:
            out["conditioncov"] = cond
        step = 0.2 * self.sigma * self.C.diagonal().sqrt()
        if bool((self.mean == self.mean + step).any()):
            out["noeffectcoord"] = 1.0
        i = self.generation % self.dim
        axis = 0.1 * self.sigma * self.D[i] * self.B[:, i]
        if bool((self.mean == self.mean + axis).all()):
            out["noeffectaxis"] = 1.0
        return out

    @property
    def condition_number(self) -> float:
        """Condition number of ``C`` from the last eigendecomposition."""
        return float((self.D.max() / self.D.min()) ** 2)
