"""Rm-ES: rank-m evolution strategy with a population-based success rule, O(m n) per sample.

Li & Zhang (2018), "A Simple Yet Efficient Evolution Strategy for Large-Scale Black-Box
Optimization", IEEE Transactions on Evolutionary Computation 22(5):637-646 (R1-ES: Algorithm 1,
Rm-ES: Algorithms 2-3). The covariance is ``(1 - c_cov)^m I + low-rank`` built from ``m`` stored
evolution paths ``P_1..P_m`` (``P_m`` the newest), sampled without any matrix::

    λ = 4 + floor(3 ln n),  μ = floor(λ/2),  log weights w_i,  μ_eff = 1 / Σ w_i^2
    m = 2,  T = n,  c_cov = 1 / (3 sqrt(n) + 5),  c = 2 / (n + 7),  c_s = 0.3,  q* = 0.3,  d_σ = 1

    x_k = mean + σ (a^m z_k + b Σ_{i=1}^m a^{m-i} r_{k,i} P_i),   a = sqrt(1 - c_cov),  b = sqrt(c_cov)
          with z_k ~ N(0, I_n) and scalars r_{k,i} ~ N(0, 1)
    mean' = Σ_{i<=μ} w_i x_{i:λ}
    p <- (1 - c) p + sqrt(c (2 - c) μ_eff) (mean' - mean) / σ

Path memory (Algorithm 2, ``t`` = generations done, ``t̂_i`` the time stamps of the stored paths):
if ``t < m`` or ``min_i (t̂_{i+1} - t̂_i) > T`` drop the oldest path, else drop the later path of the
closest pair; then append ``p`` as ``P_m`` with stamp ``t``. The newest path is always the current
``p``; older ones are kept about ``T`` generations apart.

Population-based success rule (PSR) for σ: the μ best losses of the previous and of the current
generation are ranked together (ranks 1..2μ); with ``R_prev(i)``, ``R_cur(i)`` the ranks of the
i-th best of each::

    q = Σ_{i<=μ} w_i (R_prev(i) - R_cur(i)) / μ
    s <- (1 - c_s) s + c_s (q - q*)
    σ <- σ exp(s / d_σ)

The first generation has no predecessor and leaves σ unchanged. The scalars ``r_{k,i}`` come from
``SeededNoise(seed).full((m,), generation, member=k, index=1)``. The mean step is linear in
``(z, r)``, so ``tell`` only regenerates ``Σ w_i z_{i:λ}`` (in chunks) and ``Σ w_i r_{i:λ}``.

Example:
    >>> from nograd.strategies.functions import sphere
    >>> es = RmES([1.0] * 200, sigma=0.5, seed=0)
    >>> x, f = es.optimize(sphere, max_evals=40000, target=1e-6)
    >>> f <= 1e-6
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from nograd.core import gemm
from nograd.strategies.base import F64, Strategy, _check_range, log_weights

__all__ = ["RmES"]

Tensor = torch.Tensor


class RmES(Strategy):
    """Rank-m ES with population-based success rule (Li & Zhang 2018).

    Args:
        x0, sigma, popsize, seed: see :class:`~nograd.strategies.base.Strategy`.
        paths: number ``m`` of stored evolution paths (2).
        gap: generation gap ``T`` between stored paths (default ``n``).
        c_cov, c, c_s, q_star, d_sigma: the paper's constants (see module docstring).
    """

    name = "rm-es"
    float32_samples = True
    table_in_place = True
    _state_keys = (
        "P",
        "t_hat",
        "p",
        "s",
        "prev_best",
        "weights",
        "mu",
        "mu_eff",
        "gap",
        "c_cov",
        "c",
        "c_s",
        "q_star",
        "d_sigma",
    )

    def __init__(
        self,
        x0: Tensor | Sequence[float],
        sigma: float,
        popsize: int | None = None,
        seed: int = 0,
        noise: str = "gaussian",
        *,
        paths: int = 2,
        gap: int | None = None,
        c_cov: float | None = None,
        c: float | None = None,
        c_s: float = 0.3,
        q_star: float = 0.3,
        d_sigma: float = 1.0,
    ) -> None:
        super().__init__(x0, sigma, popsize, seed, noise=noise)
        n, lam = self.dim, self.popsize
        if int(paths) != paths or paths < 1:
            raise ValueError(f"paths must be a positive integer, got {paths!r}")
        self.mu: int = lam // 2
        self.weights: Tensor = log_weights(lam, self.mu)
        self.mu_eff: float = float(1 / self.weights.square().sum())
        self.gap: int = n if gap is None else int(gap)
        if self.gap < 1:
            raise ValueError(f"gap must be >= 1, got {gap}")
        self.c_cov = _check_range("c_cov", 1 / (3 * math.sqrt(n) + 5) if c_cov is None else c_cov, 0, 1, True)
        if self.c_cov == 1:
            raise ValueError("c_cov must be < 1")
        self.c = _check_range("c", 2 / (n + 7) if c is None else c, 0.0, 1.0, lo_open=True)
        self.c_s = _check_range("c_s", c_s, 0.0, 1.0, lo_open=True)
        self.q_star = _check_range("q_star", q_star, -math.inf, math.inf)
        self.d_sigma = _check_range("d_sigma", d_sigma, 0.0, math.inf, lo_open=True)
        self.P: Tensor = torch.zeros(int(paths), n, dtype=F64)
        self.t_hat: Tensor = torch.zeros(int(paths), dtype=torch.long)
        self.p: Tensor = torch.zeros(n, dtype=F64)
        self.s: float = 0.0
        self.prev_best: Tensor | None = None
        self._r_cache: tuple[int, Tensor] | None = None

    @property
    def paths(self) -> int:
        return self.P.shape[0]

    def _path_coefficients(self) -> Tensor:
        """``b a^{m-i}`` for i = 1..m (P_m newest)."""
        a = math.sqrt(1 - self.c_cov)
        m = self.paths
        return math.sqrt(self.c_cov) * a ** torch.arange(m - 1, -1, -1, dtype=F64)

    def path_scalars(self, members: Sequence[int] | None = None) -> Tensor:
        """The scalars ``r_{k,i}`` ``(k, m)`` of the current generation."""
        if self._r_cache is None or self._r_cache[0] != self.generation:
            r = self._draw_members(range(self.popsize), index=1, size=self.paths).to(F64)
            self._r_cache = (self.generation, r)
        r = self._r_cache[1]
        return r if members is None else r[torch.as_tensor(list(members), dtype=torch.long)]

    def _step(self, z: Tensor, r: Tensor) -> Tensor:
        """``a^m z + b sum_i a^{m-i} r_i P_i`` for rows of ``z`` ``(k, n)`` and ``r`` ``(k, m)``, in
        ``z``'s dtype."""
        return self._add_paths(z * math.sqrt(1 - self.c_cov) ** self.paths, r, 1.0)

    def _add_paths(self, out: Tensor, r: Tensor, scale: float) -> Tensor:
        """``out += scale b sum_i a^{m-i} r_i P_i`` in place: float32 rows in one product with an
        inner size of ``m`` paths (:func:`nograd.core.gemm.addmm_`: one pass over ``out`` with
        MKL on Intel's CPUs), float64 ones with one rank-1 update per path."""
        coef = (r * self._path_coefficients() * scale).to(out.dtype)
        if out.dtype == torch.float32 and out.shape[0] > 1:
            return gemm.addmm_(out, coef, self.P.to(out.dtype))
        for j in range(self.P.shape[0]):
            out.addr_(coef[:, j], self.P[j].to(out.dtype))
        return out

    def _candidates(self, members: Sequence[int]) -> Tensor:
        members = list(members)
        a_m = math.sqrt(1 - self.c_cov) ** self.paths
        out = self._affine_samples(members, self.mean, self.sigma * a_m)  # = mean + σ a^m z, as _step
        return self._add_paths(out, self.path_scalars(members), self.sigma)

    def _update(self, losses: Tensor, order: Tensor) -> None:
        selected = order[: self.mu]
        z_w, _ = self._weighted_sums(selected.tolist(), self.weights)
        r_w = self.weights @ self.path_scalars(selected.tolist())
        step = self._step(z_w.unsqueeze(0), r_w.unsqueeze(0))[0]  # (mean' - mean) / σ
        self.mean = self.mean + self.sigma * step
        self.p = (1 - self.c) * self.p + math.sqrt(self.c * (2 - self.c) * self.mu_eff) * step
        # Algorithm 2: keep the stored paths about `gap` generations apart, the newest is p
        t = self.generation + 1
        m = self.paths
        drop = 0
        if m > 1:
            diffs = self.t_hat[1:] - self.t_hat[:-1]
            if not (t < m or int(diffs.min()) > self.gap):
                drop = int(torch.argmin(diffs)) + 1
        P, t_hat = self.P.clone(), self.t_hat.clone()
        P[drop:-1], t_hat[drop:-1] = self.P[drop + 1 :].clone(), self.t_hat[drop + 1 :].clone()
        P[-1], t_hat[-1] = self.p, t
        self.P, self.t_hat = P, t_hat
        # population-based success rule
        current = losses[order[: self.mu]]
        if self.prev_best is not None:
            both = torch.cat([self.prev_best, current])
            ranks = torch.empty(2 * self.mu, dtype=F64)
            ranks[torch.argsort(both, stable=True)] = torch.arange(1, 2 * self.mu + 1, dtype=F64)
            q = float(self.weights @ (ranks[: self.mu] - ranks[self.mu :])) / self.mu
            self.s = (1 - self.c_s) * self.s + self.c_s * (q - self.q_star)
            self.sigma = self.sigma * math.exp(self.s / self.d_sigma)
        self.prev_best = current.clone()

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._r_cache = None
