"""LM-MA-ES: limited-memory matrix adaptation evolution strategy, O(m n) time and memory per sample.

Loshchilov, Glasmachers & Beyer (2019), "Large Scale Black-box Optimization by Limited-Memory Matrix
Adaptation", IEEE Transactions on Evolutionary Computation 23(2):353-358, Algorithm 1. The
transformation matrix of MA-ES is replaced by ``m`` direction vectors ``M_1..M_m`` applied as
sequential rank-one transforms of the standard-normal ``z``::

    λ = 4 + floor(3 ln n),  μ = floor(λ/2),  w_i = log weights (Σ w_i = 1),  μ_w = 1 / Σ w_i^2
    m = 4 + floor(3 ln n),  c_σ = 2 λ / n
    c_d,j = 1 / (1.5^(j-1) n),  c_c,j = λ / (4^(j-1) n),      j = 1..m

    d_k = z_k;  for j = 1..min(t, m):  d_k <- (1 - c_d,j) d_k + c_d,j M_j (M_j^T d_k)
    x_k = y + σ d_k
    y   <- y + σ Σ_{i<=μ} w_i d_{i:λ}
    p_σ <- (1 - c_σ) p_σ + sqrt(μ_w c_σ (2 - c_σ)) Σ_{i<=μ} w_i z_{i:λ}
    M_j <- (1 - c_c,j) M_j + sqrt(μ_w c_c,j (2 - c_c,j)) Σ_{i<=μ} w_i z_{i:λ}       j = 1..m
    σ   <- σ exp((c_σ / 2) (||p_σ||^2 / n - 1))

``t`` is the generation counter (the ``min(t, m)`` keeps the all-zero initial vectors from
shrinking samples). The paper targets large ``n``; for ``n < 2 λ`` the rates above exceed 1, so
``c_σ`` and ``c_c,j`` are capped at 1 here (a safeguard not in the paper).

Because the transform is linear, ``Σ w_i d_{i:λ} = T(Σ w_i z_{i:λ})``: ``tell`` regenerates the μ
selected ``z`` from seeds (in chunks), sums them and transforms once. ``ask`` applies the m rank-one
transforms to the whole population with matrix ops.

Example:
    >>> from nograd.strategies.functions import sphere
    >>> es = LMMAES([1.0] * 200, sigma=0.5, seed=0)
    >>> x, f = es.optimize(sphere, max_evals=40000, target=1e-6)
    >>> f <= 1e-6
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from nograd.core import gemm
from nograd.strategies.base import F64, Strategy, log_weights

__all__ = ["LMMAES"]

Tensor = torch.Tensor


class LMMAES(Strategy):
    """Limited-memory MA-ES (Loshchilov, Glasmachers & Beyer 2019).

    Args:
        x0, sigma, popsize, seed: see :class:`~nograd.strategies.base.Strategy`.
        memory: number ``m`` of direction vectors (default ``4 + floor(3 ln n)``).
        c_sigma: step-size path rate (default ``min(1, 2 λ / n)``).
    """

    name = "lm-ma-es"
    float32_samples = True
    _state_keys = ("M", "p_sigma", "weights", "mu", "mu_w", "c_sigma", "c_d", "c_c")

    def __init__(
        self,
        x0: Tensor | Sequence[float],
        sigma: float,
        popsize: int | None = None,
        seed: int = 0,
        noise: str = "gaussian",
        *,
        memory: int | None = None,
        c_sigma: float | None = None,
    ) -> None:
        super().__init__(x0, sigma, popsize, seed, noise=noise)
        n, lam = self.dim, self.popsize
        m = 4 + int(math.floor(3 * math.log(n))) if memory is None else int(memory)
        if m < 0:
            raise ValueError(f"memory must be >= 0, got {memory}")
        self.mu: int = lam // 2
        self.weights: Tensor = log_weights(lam, self.mu)
        self.mu_w: float = float(1 / self.weights.square().sum())
        cs = min(1.0, 2 * lam / n) if c_sigma is None else float(c_sigma)
        if not 0 < cs <= 1:
            raise ValueError(f"c_sigma must be in (0, 1], got {c_sigma}")
        self.c_sigma: float = cs
        j = torch.arange(m, dtype=F64)
        self.c_d: Tensor = 1 / (1.5**j * n)
        self.c_c: Tensor = (lam / (4.0**j * n)).clamp(max=1.0)
        self.M: Tensor = torch.zeros(m, n, dtype=F64)
        self.p_sigma: Tensor = torch.zeros(n, dtype=F64)
        self._system: tuple | None = None
        self._memory: tuple | None = None

    @property
    def memory(self) -> int:
        return self.M.shape[0]

    def transform(self, z: Tensor) -> Tensor:
        """Apply the sequential rank-one transforms to the rows of ``z`` ``(k, n)``: ``d = T(z)``.

        Every transform adds a multiple of one ``M_j``, so ``d = s z + Σ_j β_j M_j``. Writing the
        recursion for the coefficients ``β`` gives a unit lower-triangular ``J x J`` system (``J =
        min(t, m)``) in ``z M^T``: ``d`` costs two ``k x J x n`` matrix products and one small triangular
        solve instead of ``J`` passes over a ``k x n`` matrix. Exactly the same map.
        """
        return self._transformed(z, 1.0, None)

    def _transformed(self, z: Tensor, factor: float, offset: Tensor | None) -> Tensor:
        """``offset + factor T(z)`` (``offset`` ``(n,)`` or None): the factor is folded into the
        coefficients and the offset added by the second product, so no extra pass over the result."""
        used = min(self.generation, self.memory)
        if used == 0:
            out = z * factor
            return out if offset is None else out.add_(offset)
        system, rhs_scale, tail, scale = self._transform_system()
        bias = None if offset is None else offset.to(z.dtype)
        if z.dtype == torch.float32:
            # float32 samples: the k x J x n products through the engine's GEMM, which reads M
            # as rows for z M^T and as columns for β M; the J x J solve stays in float64
            m, mt = self._memory_float32()
            zm = gemm.linear(z, m)

            def mix(coeffs: Tensor) -> Tensor:
                return gemm.linear(coeffs, mt, bias)
        else:  # float64 rows (tell's one weighted sum, flat problems): M is read in place
            M = self.M[:used].to(z.dtype)  # no copy for float64
            zm = z @ M.T

            def mix(coeffs: Tensor) -> Tensor:
                return coeffs @ M if bias is None else torch.addmm(bias, coeffs, M)

        beta = torch.linalg.solve_triangular(system, rhs_scale.unsqueeze(1) * zm.T.to(F64), upper=False)
        coeffs = (factor * tail.unsqueeze(1) * beta).T.to(z.dtype)  # (k, J)
        return mix(coeffs).add_(z, alpha=factor * scale)  # offset + factor (s z + β M)

    def _memory_float32(self) -> tuple[Tensor, Tensor]:
        """The used ``M_j`` in float32 as rows ``(J, n)`` and as columns ``(n, J)``, both contiguous
        (cached: ``M`` is fixed within a generation)."""
        key = (self.generation, self.M.data_ptr())
        if self._memory is None or self._memory[0] != key:
            m = self.M[: min(self.generation, self.memory)].to(torch.float32)
            self._memory = (key, (m, m.T.contiguous()))
        return self._memory[1]

    def _transform_system(self) -> tuple[Tensor, Tensor, Tensor, float]:
        """Per-generation constants of :meth:`transform` (cached: ``M`` is fixed within a generation).

        With ``a_l = 1 - c_d,l`` the transform ``j`` computes ``p_j = d_{j-1}·M_j`` and sets
        ``β_j = c_d,j p_j``, after which every earlier coefficient is scaled by ``a_j``. Hence
        ``β_j = c_d,j (Π_{l<j} a_l (z·M_j) + Σ_{i<j} Π_{i<l<j} a_l (M_i·M_j) β_i)``.

        The Gram matrix ``M_i·M_j`` (``J^2 n`` multiply-adds) is computed in the samples' dtype: with
        float32 samples its rounding is of the order of the float32 products it steers.
        """
        key = (self.generation, self.M.data_ptr())
        if self._system is not None and self._system[0] == key:
            return self._system[1]
        used = min(self.generation, self.memory)
        if self.sample_dtype == torch.float32:
            m, _ = self._memory_float32()
            gram = gemm.linear(m, m).to(F64)
        else:
            M = self.M[:used]
            gram = M @ M.T
        c = self.c_d[:used].tolist()
        a = [1 - x for x in c]
        ratio = torch.zeros(used, used, dtype=F64)  # ratio[j, i] = Π_{i<l<j} a_l
        prefix = [1.0] * (used + 1)  # prefix[j] = Π_{l<j} a_l
        for j in range(used):
            prefix[j + 1] = prefix[j] * a[j]
            prod = 1.0
            for i in range(j - 1, -1, -1):
                ratio[j, i] = prod
                prod *= a[i]
        cvec = torch.tensor(c, dtype=F64)
        system = torch.eye(used, dtype=F64) - cvec.unsqueeze(1) * (ratio * gram)
        rhs_scale = cvec * torch.tensor(prefix[:used], dtype=F64)
        tail = torch.tensor(
            [prefix[used] / prefix[i + 1] if prefix[i + 1] else 0.0 for i in range(used)], dtype=F64
        )
        if 0.0 in prefix[1:]:  # some a_l == 0 (c_d = 1, n = 1): products without division
            tail = torch.tensor([math.prod(a[i + 1 : used]) for i in range(used)], dtype=F64)
        value = (system, rhs_scale, tail, prefix[used])
        self._system = (key, value)
        return value

    def _candidates(self, members: Sequence[int]) -> Tensor:
        return self._transformed(self.standard_normal(members), self.sigma, self.mean)

    def _update(self, losses: Tensor, order: Tensor) -> None:
        n, cs = self.dim, self.c_sigma
        z_w, _ = self._weighted_sums(order[: self.mu].tolist(), self.weights)
        d_w = self.transform(z_w.unsqueeze(0))[0]
        self.mean = self.mean + self.sigma * d_w
        self.p_sigma = (1 - cs) * self.p_sigma + math.sqrt(self.mu_w * cs * (2 - cs)) * z_w
        cc = self.c_c
        self.M.mul_((1 - cc).unsqueeze(1)).addr_((self.mu_w * cc * (2 - cc)).sqrt(), z_w)  # in place
        self.sigma = self.sigma * math.exp(cs / 2 * (float(self.p_sigma.square().sum()) / n - 1))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._system = self._memory = None
