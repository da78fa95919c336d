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
selected samples from seeds (in chunks), sums them and transforms once. The Gram matrix ``G = M M^T``
is kept up to date in float64 by the rank-one form of the ``M`` update (``gram``, saved with the state).

Two ways to draw the same ``d ~ N(0, T T^T)`` (``sampling=``):

* ``"paper"``: Algorithm 1's stream. Draw ``z``, apply the rank-one transforms (two ``λ x J x n``
  matrix products for the population, ``J = min(t, m)``).
* ``"direct"``: every transform adds a multiple of one ``M_j``, so ``T = s I + M^T A M`` (``s = Π_j
  (1 - c_d,j)``, ``A`` ``J x J``) and ``T T^T = s^2 I + M^T S M`` with ``S = s (A + A^T) + A G A^T``. That
  term is positive semi-definite (each factor's singular values are at least its ``1 - c_d,j``, so
  ``T``'s are at least ``s``), and its square root ``N`` (``r x n``, ``N^T N = M^T S M``) comes from
  the ``J x J`` eigendecompositions of ``G`` and ``G^{1/2} S G^{1/2}``. Then ``d = s g + N^T u`` with
  ``g ~ N(0, I_n)`` and ``u ~ N(0, I_r)``: one product per candidate instead of two. ``r`` is the
  number of eigen-directions whose standard deviation is at least ``ε s``, ``ε`` the samples' unit
  roundoff. The ``M_j`` of slow rates are nearly parallel, so ``r`` is usually far below ``J``
  (``nograd bench es`` reports it as ``directions``). The dropped directions change no entry of
  the covariance by more than ``2 J (ε s)^2``. ``tell`` recovers ``Σ w z = T^{-1} Σ w d`` in float64
  through the push-through identity ``T^{-1} = (I - M^T (s I + A G)^{-1} A M) / s``, so the paths
  and ``M`` are updated as in the paper; one pass over column blocks of ``M`` recovers ``z``,
  updates ``M`` and builds the next generation's ``N``. With the shared noise table, each ``g`` is
  added to its candidate straight from the table, with no population-sized draw.
* ``"auto"`` (default): ``"direct"`` with float32 samples (the module adapter's populations),
  ``"paper"`` otherwise. A state saved before this option resumes with ``"paper"``.

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
SAMPLING = ("auto", "paper", "direct")
COLUMN_BLOCK_BYTES = 1 << 21  # a column block of M (float64) in one fused pass: 2 MB


class LMMAES(Strategy):
    """Limited-memory MA-ES (Loshchilov, Glasmachers & Beyer 2019).

    Args:
        x0, sigma, popsize, seed: see :class:`~nograd.strategies.base.Strategy`.
        memory: number ``m`` of direction vectors (default ``4 + floor(3 ln n)``).
        c_sigma: step-size path rate (default ``min(1, 2 λ / n)``).
        sampling: ``"auto"``, ``"paper"`` or ``"direct"``: how ``d ~ N(0, T T^T)`` is drawn (see
            the module docstring; the same distribution either way).
    """

    name = "lm-ma-es"
    float32_samples = True
    table_in_place = True
    _state_keys = ("M", "gram", "p_sigma", "weights", "mu", "mu_w", "c_sigma", "c_d", "c_c")

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
        sampling: str = "auto",
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
        if sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
        self.sampling: str = sampling
        self.M: Tensor = torch.zeros(m, n, dtype=F64)
        self.gram: Tensor = torch.zeros(m, m, dtype=F64)  # M M^T, updated with M
        self.p_sigma: Tensor = torch.zeros(n, dtype=F64)
        self._system: tuple | None = None
        self._memory: tuple | None = None
        self._factor: tuple | None = None
        self._rates: dict[int, tuple] = {}  # used -> _rate_products (tell asks for J and J + 1)

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
        system, rhs_scale, tail, scale, _ = self._transform_system()
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

    def _transform_system(self) -> tuple[Tensor, Tensor, Tensor, float, Tensor]:
        """Per-generation constants of :meth:`transform` (cached: ``M`` is fixed within a generation).

        With ``a_l = 1 - c_d,l`` the transform ``j`` computes ``p_j = d_{j-1}·M_j`` and sets
        ``β_j = c_d,j p_j``, after which every earlier coefficient is scaled by ``a_j``. Hence
        ``β_j = c_d,j (Π_{l<j} a_l (z·M_j) + Σ_{i<j} Π_{i<l<j} a_l (M_i·M_j) β_i)``.

        The Gram matrix ``M_i·M_j`` is :attr:`gram`, kept in float64 by :meth:`_update`.
        """
        if self._system is not None and self._system[0] == self.generation:
            return self._system[1]
        value = self._system_for(min(self.generation, self.memory), self.gram)
        self._system = (self.generation, value)
        return value

    def _system_for(self, used: int, gram: Tensor) -> tuple[Tensor, Tensor, Tensor, float, Tensor]:
        """:meth:`_transform_system` for ``J = used`` vectors whose Gram matrix is ``gram[:J, :J]``."""
        ratio, cvec, rhs_scale, tail, scale = self._rate_products(used)
        system = torch.eye(used, dtype=F64) - cvec.unsqueeze(1) * (ratio * gram[:used, :used])
        solved = torch.linalg.solve_triangular(system, torch.diag(rhs_scale), upper=False)
        return system, rhs_scale, tail, scale, tail.unsqueeze(1) * solved

    def _rate_products(self, used: int) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
        """The parts of :meth:`_transform_system` that depend on ``c_d`` alone (cached per ``used``:
        at most ``m + 1`` small matrices)."""
        if used in self._rates:
            return self._rates[used]
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
        rhs_scale = cvec * torch.tensor(prefix[:used], dtype=F64)
        tail = torch.tensor(
            [prefix[used] / prefix[i + 1] if prefix[i + 1] else 0.0 for i in range(used)], dtype=F64
        )
        if 0.0 in prefix[1:]:  # some a_l == 0 (c_d = 1, n = 1): products without division
            tail = torch.tensor([math.prod(a[i + 1 : used]) for i in range(used)], dtype=F64)
        value = (ratio, cvec, rhs_scale, tail, prefix[used])
        self._rates[used] = value
        return value

    def _affine(self) -> tuple[Tensor, float]:
        """``(A, s)`` with ``T = s I + M_J^T A M_J``: the coefficients ``β`` of :meth:`transform` are
        ``A (M_J z)``."""
        value = self._transform_system()
        return value[4], value[3]

    def direct_sampling(self) -> bool:
        """Whether this generation's ``d`` are drawn directly from ``N(0, T T^T)`` (see ``sampling``)."""
        if self.sampling == "auto":
            return self.sample_dtype == torch.float32
        return self.sampling == "direct"

    def covariance_factor(self) -> tuple[float, Tensor]:
        """``(s, N)``: ``T T^T = s^2 I + N^T N`` up to the directions below the samples' rounding,
        with ``N`` float64 ``(r, n)`` (see the module docstring). Cached for the generation."""
        return self._direct_factor()[:2]

    def _direct_factor(self) -> tuple[float, Tensor, Tensor]:
        """``(s, N, N^T)``: :meth:`covariance_factor` and ``N^T`` ``(n, r)`` in the samples' dtype,
        contiguous, as the product's weight."""
        if self._factor is not None and self._factor[0] == self.generation:
            return self._factor[1]
        used = min(self.generation, self.memory)
        scale, W = self._factor_for(used, self.gram)
        N = torch.empty(W.shape[1], self.dim, dtype=F64)
        for cols in self._column_chunks():
            N[:, cols] = self._factor_rows(W, used, cols)
        return self._keep_factor(self.generation, scale, N)

    def _keep_factor(self, generation: int, scale: float, N: Tensor) -> tuple[float, Tensor, Tensor]:
        cols = torch.empty(N.shape[1], N.shape[0], dtype=self.sample_dtype).copy_(N.T)  # one pass
        value = (scale, N, cols)
        self._factor = (generation, value)
        return value

    def _factor_rows(self, W: Tensor, used: int, cols: slice) -> Tensor:
        """Columns ``cols`` of ``N = W^T M_J`` (one code path: ``tell``'s and ``ask``'s agree bit for bit)."""
        return W.T @ self.M[:used, cols]

    def _column_chunks(self) -> list[slice]:
        """Column blocks of ``M`` that stay in cache between the operations of one pass over it."""
        step = max(1, COLUMN_BLOCK_BYTES // (8 * max(self.memory, 1)))
        return [slice(i, min(i + step, self.dim)) for i in range(0, self.dim, step)]

    def _factor_for(self, used: int, gram: Tensor) -> tuple[float, Tensor]:
        """``(s, W)`` with ``N = W^T M_J`` ``(r, n)``, ``W`` ``(J, r)``, for ``J = used`` vectors of Gram
        matrix ``gram``; see the module docstring."""
        if used == 0:
            return 1.0, torch.zeros(0, 0, dtype=F64)
        *_, scale, A = self._system_for(used, gram)
        G = gram[:used, :used]
        S = scale * (A + A.T) + A @ G @ A.T
        S = (S + S.T) / 2  # T T^T - s^2 I = M^T S M
        floor = (torch.finfo(self.sample_dtype).eps / 2 * scale) ** 2  # (unit roundoff x s)^2
        lam, V = torch.linalg.eigh(G)
        lam = lam.clamp(min=0)
        s_norm = float(torch.linalg.matrix_norm(S))  # Frobenius: at least the 2-norm
        # dropping a direction of the rows with eigenvalue λ_i moves M^T S M by at most this (2-norm)
        moves = 2 * (lam * lam.max()).sqrt() * s_norm + lam * s_norm
        keep = moves > floor
        root, Vk = lam[keep].sqrt(), V[:, keep]
        H = root.unsqueeze(1) * (Vk.T @ S @ Vk) * root  # G^{1/2} S G^{1/2} on the kept directions
        omega, E = torch.linalg.eigh((H + H.T) / 2)
        big = (omega > floor).flip(0)
        omega, E = omega.flip(0)[big], E.flip(1)[:, big]  # largest first
        return scale, (Vk / root) @ (E * omega.sqrt())

    def _coefficients(self, members: Sequence[int], r: int) -> Tensor:
        """The ``u ~ N(0, I_r)`` of :meth:`_candidates` (noise index 1), ``(len(members), r)``."""
        used = min(self.generation, self.memory)
        return self._draw_members(members, index=1, size=max(used, 1))[:, :r]

    def _reads_table_in_place(self) -> bool:
        """Direct sampling adds each ``g`` to its candidate straight from the shared table (the
        paper's stream transforms whole rows of ``z``, so it keeps the generation cache)."""
        return super()._reads_table_in_place() and self.direct_sampling()

    def _candidates(self, members: Sequence[int]) -> Tensor:
        if not self.direct_sampling():
            return self._transformed(self.standard_normal(members), self.sigma, self.mean)
        ids = [int(i) for i in members]
        scale, _, cols = self._direct_factor()
        mean = self.mean.to(self.sample_dtype)
        # y + σ (s g + N^T u): each row written once from its draw of g (the shared table's slices
        # read in place where that is the noise), then N^T u added in one product
        out = self._affine_samples(ids, mean, self.sigma * scale)
        if cols.shape[1]:
            gemm.addmm_(out, self._coefficients(ids, cols.shape[1]).mul_(self.sigma), cols.T)
        return out

    def untransform(self, d: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, M z)`` with ``T z = d`` for a float64 ``d`` ``(n,)``, ``M z`` over all ``m`` rows.

        Push-through identity: ``T^{-1} = (I - M_J^T (s I + A G_J)^{-1} A M_J) / s``; two products
        with ``M`` and a ``J x J`` solve.
        """
        used = min(self.generation, self.memory)
        w, scale, Mz, _ = self._pushthrough(d)
        return (d - self.M[:used].T @ w) / scale, Mz

    def _pushthrough(self, d: Tensor) -> tuple[Tensor, float, Tensor, float]:
        """``(w, s, M z, |z|^2)`` for ``z = T^{-1} d = (d - M_J^T w) / s``, from one product ``M d``."""
        used = min(self.generation, self.memory)
        Md = self.M @ d
        if used == 0:
            return torch.zeros(0, dtype=F64), 1.0, Md, float(d @ d)
        A, scale = self._affine()
        G = self.gram[:, :used]
        w = torch.linalg.solve(scale * torch.eye(used, dtype=F64) + A @ G[:used], A @ Md[:used])
        zz = (float(d @ d) - 2 * float(w @ Md[:used]) + float(w @ G[:used] @ w)) / scale**2
        return w, scale, (Md - G @ w) / scale, zz

    def _update(self, losses: Tensor, order: Tensor) -> None:
        n, cs = self.dim, self.c_sigma
        ids = order[: self.mu].tolist()
        cc = self.c_c
        keep, b = 1 - cc, (self.mu_w * cc * (2 - cc)).sqrt()  # M_j <- (1 - c_c,j) M_j + b_j z_w
        if self.direct_sampling():
            d_w = self._direct_weighted_sums(ids)
            z_w = self._update_memory_direct(d_w, keep, b)
        else:
            z_w, _ = self._weighted_sums(ids, self.weights)
            d_w = self.transform(z_w.unsqueeze(0))[0]
            self.gram = self._next_gram(self.M @ z_w, float(z_w @ z_w), keep, b)
            self.M.mul_(keep.unsqueeze(1)).addr_(b, z_w)  # in place
        self.mean = self.mean + self.sigma * d_w
        self.p_sigma = (1 - cs) * self.p_sigma + math.sqrt(self.mu_w * cs * (2 - cs)) * z_w
        self.sigma = self.sigma * math.exp(cs / 2 * (float(self.p_sigma.square().sum()) / n - 1))

    def _direct_weighted_sums(self, ids: list[int]) -> Tensor:
        """``Σ w d`` of the selected, float64, from their seeds: ``s Σ w g + N^T Σ w u``."""
        scale, N, _ = self._direct_factor()
        g_w, _ = self._weighted_sums(ids, self.weights)  # the table read in place where it is the noise
        d_w = g_w.to(F64).mul_(scale)
        if N.shape[0]:
            d_w.add_((self.weights @ self._coefficients(ids, N.shape[0]).to(F64)) @ N)
        return d_w

    def _next_gram(self, Mz: Tensor, zz: float, keep: Tensor, b: Tensor) -> Tensor:
        """Gram matrix after ``M <- D M + b z^T`` (``D = diag(keep)``), from ``M z`` and ``|z|^2``:
        ``D G D + (D M z) b^T + b (D M z)^T + |z|^2 b b^T``."""
        DMz = keep * Mz
        return (
            keep.unsqueeze(1) * self.gram * keep
            + torch.outer(DMz, b)
            + torch.outer(b, DMz)
            + zz * torch.outer(b, b)
        )

    def _update_memory_direct(self, d_w: Tensor, keep: Tensor, b: Tensor) -> Tensor:
        """``z_w = T^{-1} d_w`` (see :meth:`untransform`), then ``M``, its Gram matrix and the next
        generation's ``N`` in one pass over column blocks of ``M``; returns ``z_w``."""
        used = min(self.generation, self.memory)
        w, scale, Mz, zz = self._pushthrough(d_w)
        self.gram = self._next_gram(Mz, zz, keep, b)
        nxt = min(self.generation + 1, self.memory)
        next_scale, W = self._factor_for(nxt, self.gram)
        N = torch.empty(W.shape[1], self.dim, dtype=F64)
        z_w = torch.empty(self.dim, dtype=F64)
        for cols in self._column_chunks():
            z = z_w[cols]
            torch.sub(d_w[cols], self.M[:used, cols].T @ w, out=z).div_(scale)
            self.M[:, cols].mul_(keep.unsqueeze(1)).addr_(b, z)
            N[:, cols] = self._factor_rows(W, nxt, cols)
        self._keep_factor(self.generation + 1, next_scale, N)
        return z_w

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sampling": self.sampling}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "gram" not in state and isinstance(state.get("M"), Tensor):  # saved before gram was kept
            M = state["M"].to(F64)
            state["gram"] = M @ M.T
        sampling = state.get("sampling", "paper")  # states saved before the option sampled as the paper
        if sampling not in SAMPLING:
            raise ValueError(f"state_dict has sampling={sampling!r}, expected one of {', '.join(SAMPLING)}")
        super().load_state_dict(state)
        self.sampling = sampling
        self._system = self._memory = self._factor = None
        self._rates = {}
