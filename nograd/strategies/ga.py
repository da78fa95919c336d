"""Deep GA (Such et al. 2017, arXiv 1712.06567): a mutation-only genetic algorithm whose genomes
are seed chains.

A genome is the list of seeds ``[s_1, ..., s_k]`` that produced an individual from the initial
weights ``theta_0`` (the paper's ``tau_0`` is the seed of the random initialisation; here the
starting point is given, e.g. the model's weights):

    theta(chain) = theta_0 + sigma eps(s_1) + sigma eps(s_2) + ... + sigma eps(s_k),

with ``eps(s) ~ N(0, I)`` regenerated from the seed, so an individual is stored as ``k`` integers
and :meth:`GA.genome_to_params` rebuilds it bit-identically (the same additions in the same order).

One generation (the paper's Algorithm 1, ``N = popsize``, ``T = truncation``):

* member 0 is the elite: the best individual of the previous generation, unmutated (elitism);
* members ``1..N-1`` pick a parent uniformly among the previous generation's ``T`` best and
  append a fresh seed to its chain: ``theta' = theta_parent + sigma eps(seed)`` (Gaussian mutation,
  no crossover);
* after evaluation the ``T`` lowest losses become the parents and the lowest the next elite
  (truncation selection). The paper re-scores the top 10 on 30 extra episodes before picking the
  elite; here losses come from one batch, and the elite is re-evaluated every generation.

Generation 0 mutates ``theta_0`` (the only parent). Parents' vectors are cached (``T x dim``), so
creating a member costs one noise draw, not a replay of its chain. ``mean`` holds the elite.

``eps(seed)`` is drawn by a generator seeded with ``seed`` (``noise="gaussian"``), by the
counter-based Gaussian keyed by it (``"gaussian-counter"``), or read from the run's shared noise
table at an offset keyed by it (``"gaussian-table"``, as the Deep GA's own implementation shares
Salimans et al.'s table). Individuals are built in :attr:`sample_dtype` (float32 when the module
adapter drives float32 weights), and rebuilt in the same dtype, so the rebuild stays bit-identical.

Example:
    >>> import torch
    >>> from nograd.strategies.functions import sphere
    >>> ga = GA(torch.full((10,), 1.0), sigma=0.1, popsize=50, seed=0)
    >>> for _ in range(60):
    ...     ga.tell(sphere(ga.ask()))
    >>> bool(ga.best_f < 1.0)
    True
    >>> chain = ga.genome(3)
    >>> bool(torch.equal(ga.genome_to_params(chain), ga.member(3)))
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..core.noise import SeededNoise, derive_key
from .base import F64, Strategy, Tensor

_PARENT = 0x50415245  # tags of the two seed streams derived from the run seed
_MUTATION = 0x4D555441


class GA(Strategy):
    """Deep GA with seed-chain genomes on a flat float64 vector.

    Args:
        x0: the starting individual ``theta_0`` (dim,).
        sigma: mutation power (the paper used 0.002 to 0.005 for Atari networks).
        popsize: individuals per generation ``N`` (>= 2), elite included.
        seed: run seed; mutation seeds are derived from (seed, generation, member).
        truncation: number of parents ``T`` (default ``max(1, popsize // 5)``; the paper: 20 of 1000
            on Atari).
        elitism: keep the previous best unmutated as member 0 (the paper's default).
    """

    name: ClassVar[str] = "ga"
    float32_samples = True
    _state_keys: ClassVar[tuple[str, ...]] = ("parents", "elite")
    min_popsize: ClassVar[int] = 2

    def __init__(
        self,
        x0: Tensor | Sequence[float],
        sigma: float,
        popsize: int | None = None,
        seed: int = 0,
        noise: str = "gaussian",
        *,
        truncation: int | None = None,
        elitism: bool = True,
    ) -> None:
        super().__init__(x0, sigma, popsize, seed, noise=noise)
        t = max(1, self.popsize // 5) if truncation is None else truncation
        if isinstance(t, bool) or int(t) != t or not 1 <= t <= self.popsize:
            raise ValueError(
                f"truncation must be an integer in [1, popsize={self.popsize}], got {truncation!r}"
            )
        self.truncation = int(t)
        self.elitism = bool(elitism)
        self.x0 = self.mean.clone()
        self.parents: list[list[int]] = [[]]  # chains; generation 0 has theta_0 only
        self.elite: list[int] = []
        self._parent_vecs: list[Tensor] = [self.x0.clone()]
        # rows built this generation (member -> vector) when popsize x dim <= cache_elements
        self._rows: tuple[int, dict[int, Tensor]] = (-1, {})

    def default_popsize(self, dim: int) -> int:
        return 64

    # genomes ----------------------------------------------------------------------------
    def _buffers(self) -> tuple[Tensor, Tensor]:
        return torch.empty(self.dim, dtype=torch.float32), torch.empty(self.dim, dtype=self.sample_dtype)

    def _draw(self, seed: int, out: Tensor) -> Tensor:
        """``eps(seed)`` into the float32 ``out`` (see the module docstring for the three kinds)."""
        if self.noise_kind == "gaussian-table":  # the run's table, at an offset keyed by the seed
            return self.noise.fill_(out, generation=0, member=int(seed), index=0)
        return SeededNoise(int(seed), self.noise_kind, threads=1).fill_(out, generation=0, member=0, index=0)

    def _mutate_(self, x: Tensor, seed: int, bufs: tuple[Tensor, Tensor]) -> Tensor:
        """``x += sigma * eps(seed)`` in place; the one code path for evaluation and rebuilding."""
        if self.noise_kind == "gaussian-table":
            return self._child(x, x, seed)
        b32, wide = bufs
        self._draw(seed, b32)
        return x.add_(b32 if wide.dtype == torch.float32 else wide.copy_(b32), alpha=self.sigma)

    def _child(self, out: Tensor, parent: Tensor, seed: int) -> Tensor:
        """``out = parent + sigma * eps(seed)`` for the shared table, in one pass, its slices read
        where they lie (the numbers and the float arithmetic of :meth:`_mutate_`'s draw and add)."""
        for start, z in self.noise.member_blocks(self.dim, 0, int(seed), 0):
            end = start + z.numel()
            torch.add(parent[start:end], z, alpha=self.sigma, out=out[start:end])
        return out

    def mutation(self, seed: int) -> Tensor:
        """``eps(seed)``: the standard-normal mutation vector of one seed (float32 draws as float64)."""
        return self._draw(seed, torch.empty(self.dim, dtype=torch.float32)).to(F64)

    def genome_to_params(self, chain: Sequence[int]) -> Tensor:
        """Rebuild an individual from ``theta_0`` and its seed chain, bit-identical to evaluation
        (in :attr:`sample_dtype`, as the members are built)."""
        x = self.x0.to(self.sample_dtype, copy=True)
        bufs = self._buffers()
        for s in chain:
            self._mutate_(x, int(s), bufs)
        return x

    def _parent_index(self, member: int) -> int:
        if len(self.parents) == 1:
            return 0
        g = torch.Generator().manual_seed(derive_key(self.seed, _PARENT, self.generation, member))
        return int(torch.randint(len(self.parents), (1,), generator=g))

    def _seed(self, member: int) -> int:
        return derive_key(self.seed, _MUTATION, self.generation, member)

    def _is_elite(self, member: int) -> bool:
        return self.elitism and member == 0

    def genome(self, member: int) -> list[int]:
        """The seed chain of member ``member`` of the current generation."""
        if not 0 <= member < self.popsize:
            raise IndexError(f"member index {member} out of range for popsize {self.popsize}")
        if self._is_elite(member):
            return list(self.elite)
        return self.parents[self._parent_index(member)] + [self._seed(member)]

    def _candidates(self, members: Sequence[int]) -> Tensor:
        cache = self._rows if self.popsize * self.dim <= self.cache_elements else None
        if cache is not None and cache[0] != self.generation:
            cache = self._rows = (self.generation, {})
        out = torch.empty(len(members), self.dim, dtype=self.sample_dtype)
        bufs = self._buffers()
        for row, m in enumerate(members):
            if cache is not None and m in cache[1]:
                out[row] = cache[1][m]
            elif self._is_elite(m):
                out[row] = self.mean  # the elite as built: float32 -> float64 -> float32 is exact
            elif self.noise_kind == "gaussian-table":  # parent + sigma * eps in one pass
                self._child(out[row], self._parent_vecs[self._parent_index(m)], self._seed(m))
            else:
                # parent + sigma * eps: the same in-place float64 add as genome_to_params
                out[row] = self._parent_vecs[self._parent_index(m)]
                self._mutate_(out[row], self._seed(m), bufs)
            if cache is not None:
                cache[1][m] = out[row]
        return out

    def _update(self, losses: Tensor, order: Tensor) -> None:
        top = [int(i) for i in order[: self.truncation]]
        chains = [self.genome(i) for i in top]
        vecs = list(self._candidates(top))
        self.parents, self._parent_vecs = chains, vecs
        self.elite = chains[0]
        self.mean = vecs[0].to(F64, copy=True)
        self._rows = (-1, {})

    def _max_std(self) -> float:
        return self.sigma

    # checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["parents"] = [list(c) for c in self.parents]
        state["elite"] = list(self.elite)
        state["x0"] = self.x0.clone()
        state["truncation"] = self.truncation
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("truncation") != self.truncation:
            raise ValueError(
                f"state_dict has truncation={state.get('truncation')}, this GA {self.truncation}"
            )
        super().load_state_dict(state)
        self.x0 = state["x0"].detach().to("cpu", F64).clone()
        self.parents = [list(c) for c in state["parents"]]
        self.elite = list(state["elite"])
        self._parent_vecs = [self.genome_to_params(c) for c in self.parents]
        self._rows = (-1, {})
