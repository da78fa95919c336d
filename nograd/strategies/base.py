"""Shared ask/tell machinery for evolution strategies on flat float64 vectors.

A :class:`Strategy` samples ``popsize`` candidates per generation around ``mean``. Every
standard-normal vector it uses is regenerated from ``(seed, generation, member, index)`` by
:class:`nograd.core.noise.SeededNoise`, so the population is *lazy*: :meth:`Strategy.member` rebuilds one
candidate from seeds, and :meth:`Strategy.tell` re-derives what it needs (usually a few weighted sums
of the samples) without keeping a ``popsize x dim`` matrix alive for large ``dim``. When
``popsize * dim <= cache_elements`` the generation's samples are cached instead (pure speed-up: the
numbers are the same). With the shared noise table (``noise="gaussian-table"``) the strategies that
set :attr:`Strategy.table_in_place` read the table's slices where they lie: each candidate is
written from them in one pass and ``tell`` sums them in place, so no sample is drawn or cached.

The distribution's state (mean, step sizes, paths, covariance factors) is float64. The samples and
candidates are float64 too by default; a strategy with ``float32_samples`` driving float32 weights
may set ``sample_dtype = torch.float32`` (the module adapter does), so the population-sized work (drawing, the
candidates, the weighted sums over members) runs in float32 and only the per-dimension results
are accumulated into the float64 state.

Conventions: fitness values are **losses, lower is better** (as in pycma). NaN/inf losses are
ranked worst and counted in ``nonfinite``; a generation in which every loss is non-finite raises
:class:`nograd.core.shaping.NonFiniteFitnessError` and leaves the state untouched.

Example:
    >>> from nograd.strategies.functions import sphere
    >>> from nograd.strategies import CMAES
    >>> es = CMAES([1.0] * 5, sigma=0.5, seed=1)
    >>> x, f = es.optimize(sphere, max_evals=3000, target=1e-10)
    >>> f <= 1e-10
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch

from nograd.core.noise import SeededNoise
from nograd.core.shaping import sanitize

__all__ = ["DiagonalStd", "Strategy", "default_popsize", "expected_norm", "log_weights"]

Tensor = torch.Tensor
F64 = torch.float64
FUSED_ELEMENTS = 1 << 19  # samples squared at once in the weighted sums (2 MB of float32: in cache)


def default_popsize(dim: int) -> int:
    """``4 + floor(3 ln n)`` (Hansen 2016, tutorial Table 1), used by most strategies here."""
    return 4 + int(math.floor(3 * math.log(dim)))


def log_weights(popsize: int, mu: int | None = None) -> Tensor:
    """Positive log recombination weights ``w_i ∝ ln((λ+1)/2) - ln i``, ``i = 1..mu``, summing to 1.

    With ``mu = floor(λ/2)`` these are the positive weights of Hansen's tutorial, eq. (49)/(53).
    """
    mu = popsize // 2 if mu is None else mu
    i = torch.arange(1, mu + 1, dtype=F64)
    w = math.log((popsize + 1) / 2) - torch.log(i)
    if (w <= 0).any():  # mu > popsize/2: fall back to ln(mu + 1/2) - ln i, still decreasing and > 0
        w = math.log(mu + 0.5) - torch.log(i)
    return w / w.sum()


def expected_norm(n: int) -> float:
    """``E||N(0, I_n)|| ≈ sqrt(n) (1 - 1/(4n) + 1/(21 n^2))`` (Hansen 2016, tutorial p. 26)."""
    return math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))


GAUSSIAN_NOISES = ("gaussian", "gaussian-table", "gaussian-counter")


class Strategy:
    """Base class of the ask/tell evolution strategies.

    Args:
        x0: initial mean, a 1-D tensor or sequence of ``dim`` finite floats.
        sigma: initial step size (> 0).
        popsize: candidates per generation; ``None`` picks the strategy's default
            (``4 + floor(3 ln dim)`` for most).
        seed: seed of the :class:`~nograd.core.noise.SeededNoise` every sample is regenerated from.
        noise: ``"gaussian"``, ``"gaussian-table"`` (the shared noise table) or ``"gaussian-counter"``
            (a compiled counter-based generator): faster draws, see :mod:`nograd.core.noise`; the
            update equations assume Gaussian samples, which all three give.
        **paper_params: strategy hyperparameters, keyword-only in each subclass.

    Attributes:
        dim, popsize, seed: problem size and sampling setup.
        generation: number of completed ``tell`` calls.
        mean: float64 tensor ``(dim,)``, the distribution mean.
        sigma: the (global) step size; for strategies with a per-coordinate ``stdev`` it is its RMS.
        best_x, best_f: best candidate seen by ``tell`` (``None`` / ``inf`` before the first one).
        evaluations: total losses told; nonfinite: how many of them were NaN/inf.
    """

    name: ClassVar[str] = "strategy"
    #: attributes (tensors or python scalars) saved by :meth:`state_dict` on top of the common ones
    _state_keys: ClassVar[tuple[str, ...]] = ()
    #: cache a generation's samples when ``popsize * dim`` is at most this many elements
    cache_elements: ClassVar[int] = 1 << 22
    #: rows regenerated at once when summing over members without the cache
    chunk_elements: ClassVar[int] = 1 << 22
    min_popsize: ClassVar[int] = 2
    #: dtype of the samples and candidates (population-sized); the state stays float64
    sample_dtype: torch.dtype = F64
    #: whether the strategy's equations hold with float32 samples (the population-sized work only)
    float32_samples: ClassVar[bool] = False
    #: whether its candidates and weighted sums go through :meth:`_affine_samples` and
    #: :meth:`_weighted_sums` only, so that shared-table noise can be read in place, never drawn
    table_in_place: ClassVar[bool] = False
    _common_keys: ClassVar[tuple[str, ...]] = (
        "seed",
        "generation",
        "mean",
        "sigma",
        "sigma0",
        "best_x",
        "best_f",
        "evaluations",
        "nonfinite",
        "fbest_history",
    )

    def __init__(
        self,
        x0: Tensor | Sequence[float],
        sigma: float,
        popsize: int | None = None,
        seed: int = 0,
        noise: str = "gaussian",
        **paper_params: Any,
    ) -> None:
        if paper_params:
            raise TypeError(f"{type(self).__name__} got unknown parameter(s) {sorted(paper_params)}")
        mean = torch.as_tensor(x0).detach()
        if mean.ndim != 1 or mean.numel() < 1:
            raise ValueError(f"x0 must be a non-empty 1-D vector, got shape {tuple(mean.shape)}")
        mean = mean.to(device="cpu", dtype=F64).clone()
        if not torch.isfinite(mean).all():
            raise ValueError("x0 must be finite")
        sigma = _positive_float("sigma", sigma)
        self.dim: int = mean.numel()
        if popsize is None:
            popsize = self.default_popsize(self.dim)
        if isinstance(popsize, bool) or int(popsize) != popsize:
            raise ValueError(f"popsize must be an integer, got {popsize!r}")
        popsize = int(popsize)
        if popsize < self.min_popsize:
            raise ValueError(f"{type(self).__name__} needs popsize >= {self.min_popsize}, got {popsize}")
        if isinstance(seed, bool) or int(seed) != seed:
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.popsize: int = popsize
        if noise not in GAUSSIAN_NOISES:
            raise ValueError(f"noise must be one of {GAUSSIAN_NOISES}, got {noise!r}")
        self.seed: int = int(seed)
        self.noise_kind: str = noise
        self.noise = SeededNoise(self.seed, noise)
        self.generation: int = 0
        self.mean: Tensor = mean
        self.sigma0: float = sigma
        self.sigma = sigma
        self.best_x: Tensor | None = None
        self.best_f: float = math.inf
        self.evaluations: int = 0
        self.nonfinite: int = 0
        self.fbest_history: list[float] = []  # best loss of recent generations (for ``stop``)
        self.tolx_factor: float = 1e-12  # ``tolx = tolx_factor * sigma0``
        self.tolfun: float = 1e-12
        self._cache: tuple[int, Tensor] | None = None
        self._asked: tuple[int, Tensor] | None = None

    # ------------------------------------------------------------------ defaults and hooks
    def default_popsize(self, dim: int) -> int:
        return default_popsize(dim)

    def _candidates(self, members: Sequence[int]) -> Tensor:
        """Candidates ``(len(members), dim)`` of the current generation (subclass hook)."""
        raise NotImplementedError

    def _update(self, losses: Tensor, order: Tensor) -> None:
        """Update the distribution from sanitized ``losses`` and ``order = argsort(losses)``."""
        raise NotImplementedError

    def _max_std(self) -> float:
        """Largest coordinate-wise standard deviation of the sampling distribution (for ``tolx``)."""
        return self.sigma

    def _stop_extra(self) -> dict[str, float]:
        return {}

    # ------------------------------------------------------------------ noise
    def _draw_members(self, members: Sequence[int], index: int = 0, size: int | None = None) -> Tensor:
        """``SeededNoise(seed).full((size,), generation, member=m, index)`` for each ``m``, stacked,
        as float64 ``(len(members), size)`` (drawn through the batched ``SeededNoise.members``)."""
        n = self.dim if size is None else size
        ids = [int(m) for m in members]
        if not ids:
            return torch.empty(0, n, dtype=F64)
        z = self.noise.members((n,), generation=self.generation, members=ids, index=index)
        return z.to(self.sample_dtype)

    @property
    def _n_noise(self) -> int:
        """How many distinct standard-normal vectors a generation uses."""
        return self.popsize

    def standard_normal(self, members: Sequence[int] | Tensor | None = None) -> Tensor:
        """Standard-normal samples ``z`` ``(k, dim)`` of the current generation for noise ids ``members``.

        Row ``j`` equals ``SeededNoise(seed).full((dim,), generation=generation, member=members[j],
        index=0)`` (float32 draws cast to :attr:`sample_dtype`); taken from the generation cache when
        it is on. All the members in order return the cache itself: read it, do not write it.
        """
        ids = list(range(self._n_noise)) if members is None else [int(m) for m in members]
        cache = self._cached()
        if cache is not None:
            if ids == list(range(self._n_noise)):
                return cache
            return cache[torch.as_tensor(ids, dtype=torch.long)]
        return self._draw_members(ids)

    def _reads_table_in_place(self) -> bool:
        """Whether the samples are read from the shared noise table where they lie: each candidate
        is written from its slices in one pass and ``tell`` sums them in place, so a cache of the
        generation's draws would cost one more pass over ``popsize x dim`` numbers, not save one."""
        return self.table_in_place and self.noise_kind == "gaussian-table"

    def _affine_samples(
        self,
        ids: Sequence[int],
        loc: Tensor,
        scale: Tensor | float,
        signs: Sequence[float] | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """``loc + s_j scale ⊙ z_j`` for the noise ids ``ids`` (``s_j = signs[j]``, default 1),
        ``(len(ids), dim)`` in :attr:`sample_dtype` (into ``out`` when given): the first step of most
        strategies' sampling.

        With the shared table read in place each row is written straight from its slices
        (:meth:`~nograd.core.noise.SeededNoise.affine_members_`), with no ``z`` drawn; otherwise
        from :meth:`standard_normal` (the generation cache). The same numbers either way."""
        ids = [int(i) for i in ids]
        dt = self.sample_dtype
        loc = loc.to(dt)
        scale = scale.to(dt) if isinstance(scale, Tensor) else float(scale)
        out = torch.empty(len(ids), self.dim, dtype=dt) if out is None else out
        if self._reads_table_in_place():
            signs = None if signs is None else list(signs)
            return self.noise.affine_members_(
                out, loc, scale, generation=self.generation, members=ids, index=0, signs=signs
            )
        z = self.standard_normal(ids)
        if signs is not None:  # a sign flip is exact: the products below round as in the table's path
            z = z * torch.tensor(list(signs), dtype=z.dtype).unsqueeze(1)
        if isinstance(scale, Tensor):
            return torch.addcmul(loc, scale, z, out=out)
        return torch.add(loc, z, alpha=scale, out=out)

    def _cached(self) -> Tensor | None:
        if self._n_noise * self.dim > self.cache_elements or self._reads_table_in_place():
            return None
        if self._cache is None or self._cache[0] != self.generation:
            self._cache = (self.generation, self._draw_members(range(self._n_noise)))
        return self._cache[1]

    def _chunks(self, ids: Sequence[int]) -> Iterator[tuple[slice, Tensor]]:
        """``(slice into ids, z rows)`` in chunks of at most ``chunk_elements`` numbers."""
        step = max(1, self.chunk_elements // self.dim)
        for s in range(0, len(ids), step):
            yield slice(s, min(s + step, len(ids))), self.standard_normal(ids[s : s + step])

    def _weighted_sums(
        self, ids: Sequence[int], weights: Tensor, square_weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``sum_k w_k z_k`` and ``sum_k v_k z_k^2`` (``v = square_weights``, zeros if ``None``)
        over the noise ids ``ids``, regenerating at most ``chunk_elements`` numbers at a time."""
        s1 = torch.zeros(self.dim, dtype=F64)
        s2 = torch.zeros(self.dim, dtype=F64)
        if self._reads_table_in_place():  # each member's slices read once, where they lie
            t1 = torch.zeros(self.dim, dtype=self.sample_dtype)
            t2 = None if square_weights is None else torch.zeros(self.dim, dtype=self.sample_dtype)
            self.noise.accumulate_(
                t1,
                weights.tolist(),
                generation=self.generation,
                members=[int(i) for i in ids],
                index=0,
                squares=t2,
                square_weights=None if square_weights is None else square_weights.tolist(),
            )
            return s1.add_(t1), s2 if t2 is None else s2.add_(t2)
        cache = self._cached()
        if cache is not None and len(set(ids)) == len(ids):
            # weights scattered to the members' rows: the cache is read in place, not gathered
            where = torch.as_tensor(list(ids), dtype=torch.long)
            w = torch.zeros(self._n_noise, dtype=cache.dtype).index_copy_(0, where, weights.to(cache.dtype))
            if square_weights is None:
                return s1.add_(w @ cache), s2
            v = torch.zeros(self._n_noise, dtype=cache.dtype).index_copy_(
                0, where, square_weights.to(cache.dtype)
            )
            # both sums from one read of the samples: a few rows at a time, squared while in cache
            t1, t2 = torch.zeros(self.dim, dtype=cache.dtype), torch.zeros(self.dim, dtype=cache.dtype)
            rows = max(1, FUSED_ELEMENTS // self.dim)
            for i in range(0, self._n_noise, rows):
                block = cache[i : i + rows]
                t1.addmv_(block.T, w[i : i + rows])
                t2.addmv_(block.square().T, v[i : i + rows])
            return s1.add_(t1), s2.add_(t2)
        for sl, z in self._chunks(ids):
            s1 += (weights[sl].to(z.dtype) @ z).to(F64)
            if square_weights is not None:
                s2 += (square_weights[sl].to(z.dtype) @ z.square()).to(F64)
        return s1, s2

    # ------------------------------------------------------------------ ask / tell
    def ask(self) -> Tensor:
        """The current population, float64 ``(popsize, dim)``; asking twice returns the same."""
        X = self._candidates(range(self.popsize))
        if self.popsize * self.dim <= min(self.cache_elements, 1 << 22):  # remembered for best_x in tell
            self._asked = (self.generation, X)
        return X

    def member(self, i: int) -> Tensor:
        """Candidate ``i`` of the current generation, regenerated from seeds, float64 ``(dim,)``."""
        i = int(i)
        if not 0 <= i < self.popsize:
            raise IndexError(f"member index {i} out of range for popsize {self.popsize}")
        return self._candidates([i])[0]

    def tell(self, losses: Tensor | Sequence[float]) -> None:
        """Update the distribution from the losses of the current population (lower is better)."""
        losses = torch.as_tensor(losses).detach()
        if losses.ndim != 1 or losses.numel() != self.popsize:
            raise ValueError(
                f"tell() expects {self.popsize} losses (one per member, shape ({self.popsize},)), "
                f"got shape {tuple(losses.shape)}"
            )
        losses = losses.to(device="cpu", dtype=F64)
        clean, n_bad = sanitize(losses)  # raises NonFiniteFitnessError before any state change
        order = torch.argsort(clean, stable=True)
        i_best = int(order[0])
        f_best = float(losses[i_best])
        new_best = f_best < self.best_f
        x_best = None
        if new_best:
            asked = self._asked
            x_best = (
                asked[1][i_best].clone() if asked and asked[0] == self.generation else self.member(i_best)
            )
        self._update(clean, order)
        if new_best:
            self.best_x, self.best_f = x_best.to(F64), f_best
        self.nonfinite += n_bad
        self.evaluations += self.popsize
        self.fbest_history.append(f_best)
        del self.fbest_history[: -self._history_length()]
        self.generation += 1
        self._cache = None
        self._asked = None

    # ------------------------------------------------------------------ stopping
    def _history_length(self) -> int:
        return 10 + int(math.ceil(30 * self.dim / self.popsize))

    def stop(self) -> dict[str, float]:
        """Termination criteria that currently hold, ``{name: value}`` (empty: keep going).

        From Hansen's tutorial, Appendix B.3: ``tolx`` (all coordinate stds below ``1e-12 sigma0``),
        ``tolfun`` (best losses of the last ``10 + ceil(30 n / λ)`` generations within ``1e-12``),
        ``tolupsigma`` (``sigma / sigma0 > 1e20``, divergence), plus strategy-specific ones.
        """
        out: dict[str, float] = {}
        std = self._max_std()
        if std < self.tolx_factor * self.sigma0:
            out["tolx"] = std
        if self.sigma / self.sigma0 > 1e20:
            out["tolupsigma"] = self.sigma / self.sigma0
        h = self.fbest_history
        if len(h) >= self._history_length() and max(h) - min(h) < self.tolfun:
            out["tolfun"] = max(h) - min(h)
        out.update(self._stop_extra())
        return out

    def optimize(
        self,
        f: Callable[[Tensor], Tensor | Sequence[float] | float],
        max_evals: int,
        target: float | None = None,
        vectorized: bool = True,
    ) -> tuple[Tensor, float]:
        """Run ask/tell until ``max_evals``, ``best_f <= target`` or :meth:`stop` fires.

        ``f`` maps the ``(popsize, dim)`` population to ``popsize`` losses, or, with
        ``vectorized=False``, one ``(dim,)`` candidate to one loss (candidates are then rebuilt one at
        a time from seeds, never held together). Whole generations only: a generation that would
        exceed ``max_evals`` is not started. Returns ``(best_x, best_f)``.
        """
        if max_evals < self.popsize:
            raise ValueError(f"max_evals={max_evals} is smaller than one generation (popsize={self.popsize})")
        start = self.evaluations
        while self.evaluations - start + self.popsize <= max_evals:
            if vectorized:
                losses = torch.as_tensor(f(self.ask()), dtype=F64).flatten()
            else:
                losses = torch.tensor([float(f(self.member(i))) for i in range(self.popsize)], dtype=F64)
            self.tell(losses)
            if target is not None and self.best_f <= target:
                break
            if self.stop():
                break
        assert self.best_x is not None
        return self.best_x.clone(), self.best_f

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and python values (``torch.load(weights_only=True)`` safe)."""
        state: dict[str, Any] = {
            "strategy": self.name,
            "dim": self.dim,
            "popsize": self.popsize,
            "noise": self.noise_kind,
        }
        for key in self._common_keys + self._state_keys:
            value = getattr(self, key)
            if isinstance(value, Tensor):
                value = value.detach().clone()
            elif isinstance(value, list):
                value = list(value)
            state[key] = value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next :meth:`ask` equals the saved object's."""
        for key, mine in (("strategy", self.name), ("dim", self.dim), ("popsize", self.popsize)):
            if state.get(key) != mine:
                raise ValueError(
                    f"state_dict has {key}={state.get(key)!r}, this {type(self).__name__} has {mine!r}"
                )
        missing = [k for k in self._common_keys + self._state_keys if k not in state]
        if missing:
            raise ValueError(f"state_dict is missing {missing}")
        for key in self._common_keys + self._state_keys:
            value = state[key]
            if isinstance(value, Tensor):
                value = value.detach().to("cpu").clone()
            elif isinstance(value, list):
                value = list(value)
            setattr(self, key, value)
        self.noise_kind = str(state.get("noise", "gaussian"))  # states saved before it was an option
        self.noise = SeededNoise(self.seed, self.noise_kind)
        self._cache = None
        self._asked = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, popsize={self.popsize}, generation={self.generation}, "
            f"sigma={self.sigma:.3g}, best_f={self.best_f:.6g})"
        )


class DiagonalStd:
    """Mixin for strategies with a per-coordinate standard deviation vector ``stdev`` ``(dim,)``.

    ``sigma`` reads as the root-mean-square of ``stdev``; assigning ``sigma`` resets ``stdev`` to
    that constant (this is how the constructor's ``sigma`` initializes it).
    """

    stdev: Tensor
    dim: int

    @property
    def sigma(self) -> float:
        return float(self.stdev.square().mean().sqrt())

    @sigma.setter
    def sigma(self, value: float) -> None:
        self.stdev = torch.full((self.dim,), float(value), dtype=F64)

    def _max_std(self) -> float:
        return float(self.stdev.max())


def _positive_float(name: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive float, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return v


def _check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = float(value)
    ok = (v > lo if lo_open else v >= lo) and v <= hi and math.isfinite(v)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    return v
