"""Noise-Reuse Evolution Strategies (Li, Harrison, Sohl-Dickstein, Smith, Metz 2023, arXiv 2304.12180).

An *online* ES for unrolled computation graphs (an RNN over a long sequence, a dynamical system
simulated for ``T`` steps): instead of unrolling a whole episode per update, each worker unrolls
one truncation window of ``W`` steps, reports an estimate, and carries its state to the next
window. The loss of an episode is ``L(theta) = 1/T sum_t L_t(s_t)``. NRES samples the noise ONCE
per episode and reuses it for every window of that episode; antithetic worker ``k`` with noise
``eps_k ~ N(0, I)`` keeps two states ``s_k^+`` and ``s_k^-`` unrolled with ``theta + sigma eps_k``
and ``theta - sigma eps_k``, and for its current window ``[tau, tau + W)`` estimates

    g_k = eps_k (L_k^+ - L_k^-) / (2 sigma),    L_k^{+-} = 1/W sum_{t in window} L_t(s_{k,t}^{+-}),

    g = 1/K sum_k g_k          (K = population / 2 workers; the estimate goes to any optimizer).

Because the perturbation is the same over the whole episode, summing a worker's window estimates
gives exactly the full-episode antithetic ES estimate, so each is unbiased for the window's share
of the Gaussian-smoothed episode loss (for a fixed ``theta``), unlike truncated ES, which
re-samples noise at every window, or truncated backprop (TBPTT), which ignores the influence of
``theta`` on the state carried into the window. NRES has the lowest variance of this class of
unbiased online ES (the paper's "GPES"), lower than PES, which accumulates fresh noise per window.

Workers are *step-unlocked*: with ``stagger=True`` worker ``k`` starts ``floor(k (T/W) / K)``
windows into its first episode (a one-off warm-up of at most one episode, no updates), so the
population covers all positions of an episode at every update. At the end of an episode a
worker's states are reset (``init_state``) and its noise is re-sampled. Noise is keyed by
``(seed, direction = episode_k * K + k)``; members ``2k``/``2k+1`` are worker ``k``'s +/- sides.

The model is evaluated on the batched engine (all members in one forward; states member-major)
or one member at a time in place. ``init_state(n)`` returns the initial states of ``n``
independent episodes (leading dimension ``n * b``); ``unroll(model, state, steps)`` runs
``steps`` steps and returns ``(new_state, per_row_loss)`` with the loss averaged over the steps.

Example (the influence-balancing system of Tallec & Ollivier 2017, see
:mod:`nograd.bench.nres_tbptt`):
    >>> import torch
    >>> from nograd.bench.nres_tbptt import InfluenceBalancing, episode_loss, unroll
    >>> model = InfluenceBalancing(theta=0.0)
    >>> nres = NRES(model, sigma=0.01, population=128, window=10, episode_length=200,
    ...             init_state=model.init_state, optimizer=torch.optim.SGD(model.parameters(), lr=0.002))
    >>> before = episode_loss(model, 200)
    >>> for _ in range(40):
    ...     _ = nres.step(unroll)
    >>> bool(episode_loss(model, 200) < before)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..core.distributed import Collective
from ..core.engine import BatchedPerturbation, InPlacePerturbation, ParamSpace, accumulate
from ..core.noise import DISTRIBUTIONS, SeededNoise
from ..core.shaping import NonFiniteFitnessError

State = torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]
MODES = ("batched", "inplace")
_GENERATION = 0  # every direction id is unique, so one noise "generation" serves the whole run


def _map(fn: Callable[..., torch.Tensor], *states: State) -> State:
    first = states[0]
    if isinstance(first, torch.Tensor):
        return fn(*states)
    return type(first)(fn(*parts) for parts in zip(*states))


def _rows(state: State) -> int:
    return (state if isinstance(state, torch.Tensor) else state[0]).shape[0]


class NRES:
    """Noise-Reuse ES for truncated unrolls of a recurrent model or dynamical system.

    Args:
        model: the module whose trainable tensors are learned.
        sigma: noise scale (> 0).
        population: members per window (even: ``population / 2`` antithetic workers).
        window: truncation length ``W`` (steps per update).
        episode_length: ``T``, a multiple of ``window``.
        init_state: ``init_state(n) -> state`` with a leading dimension of ``n * b`` rows.
        optimizer: a torch optimizer over the model's parameters (estimate in ``.grad``), or
            ``None`` for an in-place SGD step with ``lr``.
        rank: 0 for dense noise, r > 0 for EGGROLL low-rank matrix noise.
        seed: noise seed.
        mode: ``"batched"`` (one forward for all members) or ``"inplace"`` (one at a time).
        stagger: step-unlock the workers (spread over the episode's windows).
        stagger_unroll: reach the staggered positions by unrolling (a warm-up of at most one
            episode); ``False`` just assigns them, which is exact when the state does not depend
            on the position (a model without recurrent state).
        process_group: a ``torch.distributed`` process group: each rank unrolls its block of
            workers, and their window losses and new states are all-gathered (the states are
            the members' own, so this traffic is the state's size, never the weights').
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma: float,
        population: int,
        window: int,
        episode_length: int,
        init_state: Callable[[int], State],
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        lr: float | None = None,
        rank: int = 0,
        seed: int = 0,
        mode: str = "batched",
        stagger: bool = True,
        stagger_unroll: bool = True,
        noise: str = "gaussian",
        process_group: Any = None,
        compile: bool = False,
    ) -> None:
        if not (sigma > 0):
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if int(population) != population or population < 2 or population % 2:
            raise ValueError(
                f"population must be an even integer >= 2 (antithetic workers), got {population}"
            )
        if int(window) != window or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window}")
        if int(episode_length) != episode_length or episode_length < window or episode_length % window:
            raise ValueError(
                f"episode_length must be a positive multiple of window={window}, got {episode_length}"
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if noise not in DISTRIBUTIONS:
            raise ValueError(f"noise must be one of {DISTRIBUTIONS}, got {noise!r}")
        if int(rank) != rank or rank < 0:
            raise ValueError(f"rank must be an integer >= 0, got {rank}")
        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizers: list[torch.optim.Optimizer] = [optimizer]
        else:
            self.optimizers = list(optimizer or [])
        if not self.optimizers and (lr is None or not lr > 0):
            raise ValueError(f"give an optimizer, or lr > 0 for the in-place SGD step (got lr={lr})")
        if self.optimizers and lr is not None:
            raise ValueError(
                "lr is for the in-place SGD step; set the learning rate on the optimizer instead"
            )
        self.model = model
        self.sigma = float(sigma)
        self.population = int(population)
        self.workers = self.population // 2
        self.window = int(window)
        self.episode_length = int(episode_length)
        self.init_state = init_state
        self.lr = None if lr is None else float(lr)
        self.rank = int(rank)
        self.seed = int(seed)
        self.mode = mode
        self.compile = bool(compile)
        self.stagger = bool(stagger)
        self.stagger_unroll = bool(stagger_unroll)
        self.noise_kind = noise
        self.noise = SeededNoise(self.seed, noise)
        self.space = ParamSpace(model, rank=self.rank)
        self._batched: BatchedPerturbation | None = None
        self._inplace: InPlacePerturbation | None = None
        self.episode = [0] * self.workers  # episodes each worker has started (noise id)
        self.position = [0] * self.workers  # steps into the current episode
        self.state: State | None = None  # member-major: member m's rows [m b, (m + 1) b)
        self.updates = 0
        self.last_info: dict[str, float] = {}
        self.collective = Collective(process_group)
        if self.collective.world_size > self.workers:
            raise ValueError(
                f"{self.workers} antithetic workers cannot be shared by "
                f"{self.collective.world_size} processes"
            )

    # members --------------------------------------------------------------------------------
    def directions(self) -> list[tuple[int, float]]:
        """(noise direction, scale) of each member: worker k's current episode's noise, +/- sigma."""
        out = []
        for m in range(self.population):
            k = m // 2
            out.append((self.episode[k] * self.workers + k, self.sigma if m % 2 == 0 else -self.sigma))
        return out

    def _fresh(self) -> State:
        """Initial states of all members: one episode per worker, shared by its +/- members."""
        pairs = self.init_state(self.workers)
        return _map(
            lambda t: t.reshape(self.workers, -1, *t.shape[1:]).repeat_interleave(2, 0).flatten(0, 1), pairs
        )

    def _member_mask(self, members: Sequence[bool], state: State) -> torch.Tensor:
        b = _rows(state) // self.population
        return torch.tensor(
            members, device=(state if isinstance(state, torch.Tensor) else state[0]).device
        ).repeat_interleave(b)

    def _select(self, mask_members: Sequence[bool], new: State, old: State) -> State:
        mask = self._member_mask(mask_members, new)

        def pick(n: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
            return torch.where(mask.view(-1, *([1] * (n.dim() - 1))), n, o)

        return _map(pick, new, old)

    # unrolling --------------------------------------------------------------------------------
    def _unroll(
        self, unroll: Callable[..., tuple[State, torch.Tensor]], state: State
    ) -> tuple[State, torch.Tensor]:
        members = self.collective.share(self.population, 2)  # this rank's workers' +/- members
        b = _rows(state) // self.population
        new, losses = self._unroll_members(unroll, state, members, b)
        if not self.collective.active:
            return new, losses
        rows = self.population * b
        return (
            _map(lambda t: self.collective.gather(t, rows, 2 * b), new),
            self.collective.gather(losses, self.population, 2),
        )

    def _unroll_members(
        self, unroll: Callable[..., tuple[State, torch.Tensor]], state: State, members: range, b: int
    ) -> tuple[State, torch.Tensor]:
        dirs = [self.directions()[m] for m in members]
        mine = _map(lambda t: t[members.start * b : members.stop * b], state)
        if self.mode == "batched":
            if self._batched is None:
                self._batched = BatchedPerturbation(self.model, self.space, self.noise, compile=self.compile)
            with self._batched.apply(_GENERATION, dirs):
                new, per_row = unroll(self.model, mine, self.window)
            per_row = torch.as_tensor(per_row).detach().float()
            if per_row.numel() != _rows(mine):
                raise ValueError(
                    f"unroll must return one loss per state row ({_rows(mine)}), got {per_row.numel()}"
                )
            return _map(torch.Tensor.detach, new), per_row.view(len(members), -1).mean(1).cpu()
        if self._inplace is None:
            self._inplace = InPlacePerturbation(self.space, self.noise, module=self.model)
        parts, losses = [], torch.empty(len(members))
        with torch.no_grad():
            for i, (d, scale) in enumerate(dirs):
                rows = _map(lambda t, i=i: t[i * b : (i + 1) * b], mine)
                with self._inplace.apply(_GENERATION, d, scale):
                    new, per_row = unroll(self.model, rows, self.window)
                parts.append(_map(torch.Tensor.detach, new))
                losses[i] = torch.as_tensor(per_row).detach().float().mean()
        return _map(lambda *ts: torch.cat(ts), *parts), losses

    def _advance(self, new: State, active: Sequence[bool]) -> None:
        """Commit the states of ``active`` workers; reset and re-noise those at an episode's end."""
        members = [active[m // 2] for m in range(self.population)]
        self.state = self._select(members, new, self.state)
        done = []
        for k in range(self.workers):
            if active[k]:
                self.position[k] += self.window
            done.append(self.position[k] >= self.episode_length)
        if any(done):
            for k in range(self.workers):
                if done[k]:
                    self.position[k] = 0
                    self.episode[k] += 1
            self.state = self._select(
                [done[m // 2] for m in range(self.population)], self._fresh(), self.state
            )

    def _start(self, unroll: Callable[..., tuple[State, torch.Tensor]]) -> None:
        self.state = self._fresh()
        if not self.stagger:
            return
        windows = self.episode_length // self.window
        offsets = [k * windows // self.workers for k in range(self.workers)]
        if not self.stagger_unroll:
            self.position = [o * self.window for o in offsets]
            return
        for w in range(max(offsets)):
            new, _ = self._unroll(unroll, self.state)
            self._advance(new, [o > w for o in offsets])

    def step(self, unroll: Callable[..., tuple[State, torch.Tensor]]) -> torch.Tensor:
        """Unroll every member one window, update ``theta``; returns the members' window losses (P,).

        If every loss is NaN/inf a :class:`~nograd.core.shaping.NonFiniteFitnessError` is raised with the
        weights untouched; the states still advance. Non-finite members contribute nothing (their
        worker's estimate is dropped and counted).
        """
        if self.state is None:
            self._start(unroll)
        dirs = self.directions()
        new, losses = self._unroll(unroll, self.state)
        self._advance(new, [True] * self.workers)
        plus, minus = losses[0::2].double(), losses[1::2].double()
        ok = torch.isfinite(plus) & torch.isfinite(minus)
        if not bool(ok.any()):
            raise NonFiniteFitnessError(
                "every NRES worker's window loss is NaN/inf; the weights were left unchanged"
            )
        coeffs = [
            (dirs[2 * k][0], float(plus[k] - minus[k]) / (2 * self.sigma * self.workers))
            for k in range(self.workers)
            if ok[k]
        ]
        if self.optimizers:
            accumulate(self.space, self.noise, _GENERATION, coeffs, into="grad")
            for opt in self.optimizers:
                opt.step()
        else:
            accumulate(self.space, self.noise, _GENERATION, coeffs, lr=self.lr, into="update")
        self.updates += 1
        finite = losses[torch.isfinite(losses)]
        self.last_info = {
            "loss_mean": float(finite.mean()),
            "nonfinite": float((~torch.isfinite(losses)).sum()),
        }
        return losses

    # checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self.state
        if state is not None:
            state = _map(lambda t: t.detach().clone(), state)
        return {
            "seed": self.seed,
            "updates": self.updates,
            "episode": list(self.episode),
            "position": list(self.position),
            "state": state,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if len(saved["episode"]) != self.workers:
            raise ValueError(f"saved state has {len(saved['episode'])} workers, this NRES {self.workers}")
        if len(saved["optimizers"]) != len(self.optimizers):
            raise ValueError("saved state has a different number of outer optimizers")
        self.seed = int(saved["seed"])
        self.noise = SeededNoise(self.seed, self.noise_kind)
        self._batched = self._inplace = None
        self.updates = int(saved["updates"])
        self.episode = list(saved["episode"])
        self.position = list(saved["position"])
        self.state = None if saved["state"] is None else _map(lambda t: t.clone(), saved["state"])
        for opt, s in zip(self.optimizers, saved["optimizers"]):
            opt.load_state_dict(s)
