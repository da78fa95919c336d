"""Gaussian evolution strategies on a module's parameters: the base of OpenAI-ES and EGGROLL.

One generation ``t`` of an antithetic Gaussian ES (Salimans et al. 2017, arXiv 1703.03864;
Sarkar et al. 2025, arXiv 2511.16652 for the low-rank variant):

* member ``m`` evaluates ``theta + s_m sigma E_{d_m}`` with ``d_m = m // 2`` and
  ``s_m = +1, -1`` for even/odd ``m`` (antithetic pairs share a direction), where ``E_d`` is
  dense Gaussian noise (``rank = 0``) or, for a matrix, the low-rank ``A_d B_d^T / sqrt(r)``;
* its loss ``L_m`` is shaped into a utility ``u_m`` (:meth:`ModuleES.utilities`; larger is
  worse, so the estimate points uphill on the loss);
* the gradient estimate of the Gaussian-smoothed loss is

      g = 1 / (P sigma) * sum_m u_m s_m E_{d_m},

  i.e. coefficient ``c_d = (u_{2d} - u_{2d+1}) / (P sigma)`` per direction, rebuilt from the
  seeds by :func:`nograd.core.engine.accumulate` (one GEMM per low-rank matrix);
* the step: ``g + weight_decay * theta`` goes into ``.grad`` and the user's torch optimizer
  steps (SGD, Adam, AdamW, Muon, ...), or without an optimizer the in-place SGD step
  ``theta <- theta (1 - lr wd) - lr g`` is applied with no model-sized buffer.

Members are evaluated either all in one forward on the batched engine (``mode="batched"``,
member-major rows, inference throughput) or one at a time at inference memory
(``mode="inplace"``); both use the same seeds, so they give the same losses up to rounding.

Example:
    >>> import torch
    >>> from torch import nn
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = nn.Linear(4, 1)
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> def loss_fn(m, x, y):
    ...     return ((m(x) - y) ** 2).mean(1)
    >>> es = ModuleES(model, sigma=0.05, population=16, lr=0.1, seed=0)
    >>> losses = es.step(loss_fn, x, y)
    >>> losses.shape
    torch.Size([16])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.distributed import Collective
from ..core.engine import BatchedPerturbation, InPlacePerturbation, ParamSpace, accumulate, member_directions
from ..core.noise import DISTRIBUTIONS, SeededNoise
from ..core.rounding import round_key, scale_rounded_
from ..core.shaped_noise import ShapedNoise
from ..core.shaping import SHAPINGS, NonFiniteFitnessError, shape

MODES = ("batched", "inplace")
ModuleLossFn = Callable[..., torch.Tensor]
"""``loss_fn(model, *batch) -> Tensor (N,)``: one loss per row of the batch."""


def repeat_rows(batch: Sequence[Any], k: int) -> list[Any]:
    """Repeat every tensor of ``batch`` ``k`` times along dim 0 (member-major); others unchanged."""
    out = []
    for t in batch:
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            out.append(t.repeat(k, *([1] * (t.dim() - 1))))
        else:
            out.append(t)
    return out


def member_means(per_row: torch.Tensor, members: int, rows: int) -> torch.Tensor:
    """Each member's mean over its ``rows`` consecutive per-row losses, ``(members,)``; a
    ValueError unless ``loss_fn`` gave one loss per row."""
    if per_row.numel() != members * rows:
        raise ValueError(
            f"loss_fn must return one loss per row ({members * rows} for {members} members x "
            f"{rows} rows), got shape {tuple(per_row.shape)}"
        )
    return per_row.reshape(members, rows).mean(1)


def batch_rows(batch: Sequence[Any]) -> int:
    """Rows of the first tensor of ``batch`` (the per-member batch size)."""
    for t in batch:
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return t.shape[0]
    raise ValueError("the batch holds no tensor with a batch dimension")


MAX_GUIDE_HISTORY = 32  # each kept estimate is a copy of the model's trainable tensors
LOG_SCALE_BOUND = math.log(10.0)  # adapted per-tensor noise scales stay within [sigma / 10, 10 sigma]


@dataclass(frozen=True)
class DirectionSampling:
    """How a generation's directions are drawn, beyond i.i.d. Gaussians (:mod:`nograd.core.shaped_noise`).

    Args:
        orthogonal: orthogonalise the isotropic directions of a generation in blocks.
        guided: fraction of the directions drawn from the subspace of the last
            ``guide_history`` estimates of each tensor (guided ES); 0 turns it off.
        guide_history: estimates kept per tensor for the guiding subspace (its dimension k).
        sigma_lr: learning rate of the per-tensor log noise scales (0: one sigma for all). The
            natural-gradient step of SNES on each tensor's scale ``alpha_i``:
            ``log alpha_i -= sigma_lr / P sum_m u_m (||E_{d_m, i}||^2 / n_i - 1)``, where ``u`` are
            the shaped losses (larger = worse): a tensor whose larger draws go with worse losses
            is perturbed less, one whose larger draws go with better losses more.
    """

    orthogonal: bool = False
    guided: float = 0.0
    guide_history: int = 4
    sigma_lr: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.guided < 1.0:
            raise ValueError(f"guided must be a fraction in [0, 1), got {self.guided}")
        if int(self.guide_history) != self.guide_history or not 1 <= self.guide_history <= MAX_GUIDE_HISTORY:
            raise ValueError(
                f"guide_history must be an integer in [1, {MAX_GUIDE_HISTORY}] (estimates kept per tensor), "
                f"got {self.guide_history}"
            )
        if not (self.sigma_lr >= 0.0 and math.isfinite(self.sigma_lr)):
            raise ValueError(f"sigma_lr must be finite and >= 0, got {self.sigma_lr}")

    @property
    def active(self) -> bool:
        return self.orthogonal or self.guided > 0 or self.sigma_lr > 0

    @property
    def needs_estimate(self) -> bool:
        """Whether the strategy must see each tensor's estimate (guides, scale corrections)."""
        return self.guided > 0 or self.sigma_lr > 0


def _subspace(
    past: list[torch.Tensor], lowrank: bool, shape: tuple[int, int]
) -> tuple[torch.Tensor, ...] | None:
    """Orthonormal bases of the span of a tensor's last estimates: ``(U, V)`` of their column and
    row spaces for a low-rank matrix, ``(Q,)`` for a dense tensor; None before the first estimate."""
    if not past:
        return None
    if lowrank:
        out_f, in_f = shape
        mats = [g.reshape(out_f, in_f) for g in past]
        k = min(len(mats), out_f, in_f)
        u = torch.linalg.svd(torch.cat(mats, dim=1), full_matrices=False).U[:, :k]
        v = torch.linalg.svd(torch.cat(mats, dim=0), full_matrices=False).Vh[:k].T
        return u.contiguous(), v.contiguous()
    cols = torch.stack([g.flatten() for g in past], dim=1)
    if cols.shape[0] < 2:
        return None
    q = torch.linalg.qr(cols).Q[:, : min(cols.shape)]
    return (q.contiguous(),)


class ModuleES:
    """Antithetic Gaussian ES on the trainable tensors of ``model``.

    Args:
        model: the module; tensors with ``requires_grad=True`` are searched over.
        sigma: noise scale (> 0).
        population: members per generation (even with ``antithetic``).
        rank: 0 for dense noise (OpenAI-ES), r > 0 for rank-r matrix perturbations (EGGROLL).
        optimizer: a torch optimizer (or a list, e.g. Muon for matrices + AdamW for the rest)
            over the model's parameters; the estimate is written into ``.grad`` and each
            ``optimizer.step()`` is called. ``None``: in-place SGD with ``lr``.
        lr: learning rate of the in-place SGD step (only without ``optimizer``).
        weight_decay: L2 coefficient added to the estimate (``g + wd * theta``).
        shaping: ``"centered-ranks"``, ``"zscore"`` or ``"raw"`` (see :mod:`nograd.core.shaping`).
        seed: run seed of the noise.
        antithetic: mirrored pairs (recommended); otherwise each member has its own direction.
        mode: ``"batched"`` (all members in one forward) or ``"inplace"`` (one at a time).
        chunk_size: members per forward in batched mode (``None``: all).
        noise: ``"gaussian"``, ``"rademacher"``, ``"gaussian-table"`` or ``"gaussian-counter"`` (both
            faster, see ``nograd.core.noise``).
        process_group: a ``torch.distributed`` process group to share the population with:
            each rank evaluates its block of members (whole antithetic pairs), one all-gather
            of the losses, the same update on every rank (:mod:`nograd.core.distributed`).
        compile: run the batched population forward through ``torch.compile`` (compiled once,
            on the first generation; eager with one warning if compilation fails).
        sampling: :class:`DirectionSampling` (orthogonal, guided, per-tensor scales); guided
            directions and adapted scales need an ``optimizer``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma: float,
        population: int,
        rank: int = 0,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        lr: float | None = None,
        weight_decay: float = 0.0,
        shaping: str = "centered-ranks",
        seed: int = 0,
        antithetic: bool = True,
        mode: str = "batched",
        chunk_size: int | None = None,
        noise: str = "gaussian",
        process_group: Any = None,
        compile: bool = False,
        sampling: DirectionSampling | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not (sigma > 0):
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if int(population) != population or population < 2 or (antithetic and population % 2):
            raise ValueError(
                f"population must be an integer >= 2{' and even (antithetic pairs)' if antithetic else ''}, "
                f"got {population}"
            )
        if int(rank) != rank or rank < 0:
            raise ValueError(f"rank must be an integer >= 0, got {rank}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if shaping not in SHAPINGS:
            raise ValueError(f"shaping must be one of {SHAPINGS}, got {shaping!r}")
        if noise not in DISTRIBUTIONS:
            raise ValueError(f"noise must be one of {DISTRIBUTIONS}, got {noise!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not optimizer:
            if lr is None or not (lr > 0):
                raise ValueError(f"give an optimizer, or lr > 0 for the in-place SGD step (got lr={lr})")
        elif lr is not None:
            raise ValueError(
                "lr is for the in-place SGD step; set the learning rate on the optimizer instead"
            )
        self.model = model
        self.sigma = float(sigma)
        self.population = int(population)
        self.rank = int(rank)
        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizers: list[torch.optim.Optimizer] = [optimizer]
        else:
            self.optimizers = list(optimizer or [])
        self.optimizer = self.optimizers[0] if len(self.optimizers) == 1 else None
        self.lr = None if lr is None else float(lr)
        self.weight_decay = float(weight_decay)
        self.shaping = shaping
        self.seed = int(seed)
        self.antithetic = bool(antithetic)
        self.mode = mode
        self.chunk_size = chunk_size
        self.noise_kind = noise
        self.sampling = sampling or DirectionSampling()
        n_dirs = self.population // 2 if self.antithetic else self.population
        self._guided_dirs = round(self.sampling.guided * n_dirs)
        if self.sampling.guided and not 1 <= self._guided_dirs < n_dirs:
            raise ValueError(
                f"guided={self.sampling.guided} of {n_dirs} directions leaves no guided or no isotropic "
                "direction; use a larger population or another fraction"
            )
        if self.sampling.needs_estimate and not optimizer:
            raise ValueError(
                "guided directions and adapted sigmas need an optimizer (not the in-place SGD step)"
            )
        self.space = ParamSpace(model, rank=self.rank)
        self.log_scales = torch.zeros(len(self.space), dtype=torch.float64)
        self.history: list[list[torch.Tensor]] = [[] for _ in self.space.tensors]
        self.noise = self._make_noise()
        if self.optimizers:
            in_opt = {id(p) for opt in self.optimizers for g in opt.param_groups for p in g["params"]}
            missing = [n for n, p in zip(self.space.names, self.space.tensors) if id(p) not in in_opt]
            if missing:
                raise ValueError(
                    f"the optimizer does not hold trainable parameter(s) {missing[:3]}; build it over "
                    "model.parameters() or set requires_grad=False on tensors to keep fixed"
                )
        self.compile = bool(compile)
        self._batched: BatchedPerturbation | None = None
        self._inplace: InPlacePerturbation | None = None
        self.generation = 0
        self.last_info: dict[str, float] = {}
        self.collective = Collective(process_group)

    def _make_noise(self) -> SeededNoise:
        if not self.sampling.active:
            return SeededNoise(self.seed, self.noise_kind)
        n_dirs = self.population // 2 if self.antithetic else self.population
        noise = ShapedNoise(
            self.seed,
            self.noise_kind,
            directions=n_dirs,
            orthogonal=self.sampling.orthogonal,
            guided=self._guided_dirs,
        )
        self._share_shaping(noise)
        return noise

    def _share_shaping(self, noise: SeededNoise) -> None:
        """Hand the current scales and guides to the noise the engines read."""
        if not isinstance(noise, ShapedNoise):
            return
        noise.scales = {i: math.exp(v) for i, v in enumerate(self.log_scales.tolist()) if v != 0.0}
        noise.guides = {}
        if self._guided_dirs:
            for i, past in enumerate(self.history):
                guide = _subspace(past, self.space.lowrank[i], self.space.matrix_shape(i))
                if guide is not None:
                    noise.guides[i] = guide

    # members ------------------------------------------------------------------------------
    def directions(self, members: Sequence[int] | range | None = None) -> list[tuple[int, float]]:
        """(noise direction, scale) of each member id of the current generation."""
        ids = range(self.population) if members is None else members
        return member_directions(ids, self.sigma, self.antithetic)

    @property
    def batched(self) -> BatchedPerturbation:
        if self._batched is None:
            self._batched = BatchedPerturbation(self.model, self.space, self.noise, compile=self.compile)
        return self._batched

    @property
    def inplace(self) -> InPlacePerturbation:
        if self._inplace is None:
            self._inplace = InPlacePerturbation(self.space, self.noise, module=self.model)
        return self._inplace

    # evaluation ---------------------------------------------------------------------------
    def evaluate(self, loss_fn: ModuleLossFn, *batch: Any) -> torch.Tensor:
        """Losses ``(P,)`` of the current generation's members on the same batch.

        ``loss_fn(model, *batch)`` returns one loss per row; a member's loss is its rows' mean.
        In batched mode every tensor of ``batch`` is repeated member-major (``k * b`` rows).
        With a process group this rank evaluates its share and the losses are all-gathered.
        """
        return self.collective.gather(self.evaluate_share(loss_fn, *batch), self.population, self._unit)

    @property
    def _unit(self) -> int:
        return 2 if self.antithetic else 1  # a share holds whole antithetic pairs

    def evaluate_share(self, loss_fn: ModuleLossFn, *batch: Any) -> torch.Tensor:
        """Losses of this rank's members only (all members in one process): :meth:`evaluate` before
        the all-gather."""
        members = self.collective.share(self.population, self._unit)
        if self.mode == "batched":
            return self._evaluate_batched(loss_fn, batch, members)
        return self._evaluate_inplace(loss_fn, batch, members)

    def _evaluate_batched(self, loss_fn: ModuleLossFn, batch: Sequence[Any], members: range) -> torch.Tensor:
        b = batch_rows(batch)
        chunk = self.population if self.chunk_size is None else self.chunk_size
        out = []
        for start in range(members.start, members.stop, chunk):
            dirs = self.directions(range(start, min(members.stop, start + chunk)))
            rows = repeat_rows(batch, len(dirs))
            with self.batched.apply(self.generation, dirs):
                per_row = loss_fn(self.model, *rows)
            out.append(member_means(torch.as_tensor(per_row).detach().float(), len(dirs), b))
        return torch.cat(out).cpu() if out else torch.empty(0)

    def _evaluate_inplace(self, loss_fn: ModuleLossFn, batch: Sequence[Any], members: range) -> torch.Tensor:
        out = torch.empty(len(members))
        with torch.no_grad():
            for i, (d, scale) in enumerate(self.directions(members)):
                with self.inplace.apply(self.generation, d, scale):
                    out[i] = torch.as_tensor(loss_fn(self.model, *batch)).detach().float().mean()
        return out

    # update -------------------------------------------------------------------------------
    def utilities(self, losses: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Shaped utilities (larger = worse) and the number of non-finite losses."""
        return shape(losses, self.shaping)

    def coefficients(self, utilities: torch.Tensor) -> list[tuple[int, float]]:
        """``c_d = sum_{m: d_m = d} u_m scale_m / (P sigma^2)``, so that ``g = sum_d c_d E_d``."""
        coeff: dict[int, float] = {}
        norm = self.population * self.sigma**2
        for (d, scale), u in zip(self.directions(), utilities.tolist()):
            coeff[d] = coeff.get(d, 0.0) + u * scale / norm
        return list(coeff.items())

    def update(self, losses: torch.Tensor) -> dict[str, float]:
        """Turn the current generation's losses into a step; then move to the next generation.

        Non-finite losses are ranked worst and counted; if all are non-finite a
        :class:`~nograd.core.shaping.NonFiniteFitnessError` is raised, the weights and optimizer state
        are left untouched, and the generation still advances (the next try draws new noise).
        """
        losses = torch.as_tensor(losses, dtype=torch.float64).flatten()
        if losses.numel() != self.population:
            raise ValueError(f"expected {self.population} losses, got {losses.numel()}")
        try:
            u, n_bad = self.utilities(losses)
        except NonFiniteFitnessError:
            self.generation += 1
            raise
        coeffs = self.coefficients(u)
        if self.optimizers:
            accumulate(self.space, self.noise, self.generation, coeffs, into="grad")
            if self.sampling.needs_estimate:
                self._follow_estimate(u)
            if self.weight_decay:
                with torch.no_grad():
                    for p in self.space.tensors:
                        p.grad.add_(p.detach(), alpha=self.weight_decay)
            for opt in self.optimizers:
                opt.step()
        else:
            if self.weight_decay:
                with torch.no_grad():
                    for i, p in enumerate(self.space.tensors):
                        key = round_key(self.noise.seed, self.generation, i, 1)
                        scale_rounded_(p.data, 1.0 - self.lr * self.weight_decay, key)
            accumulate(self.space, self.noise, self.generation, coeffs, lr=self.lr, into="update")
        finite = losses[torch.isfinite(losses)]
        self.generation += 1
        self.last_info = {
            "loss_mean": float(finite.mean()),
            "loss_min": float(finite.min()),
            "nonfinite": float(n_bad),
        }
        return self.last_info

    def _follow_estimate(self, utilities: torch.Tensor) -> None:
        """Correct each tensor's estimate for its scale, keep it for the guides, adapt the scales,
        and hand the next generation's scales and guides to the noise."""
        scales = torch.exp(self.log_scales).tolist()
        if self.sampling.sigma_lr:
            step = self.sampling.sigma_lr * self._scale_gradient(utilities, scales)
            self.log_scales = (self.log_scales - step).clamp(-LOG_SCALE_BOUND, LOG_SCALE_BOUND)
        keep = self.sampling.guide_history
        with torch.no_grad():
            for i, p in enumerate(self.space.tensors):
                # accumulate rebuilt alpha_i sum c E from the scaled draws; the estimate is sum c E / alpha_i
                if scales[i] != 1.0:
                    p.grad.div_(scales[i] ** 2)
                if self._guided_dirs:
                    self.history[i] = [*self.history[i], p.grad.detach().float().clone()][-keep:]
        self._share_shaping(self.noise)

    def _scale_gradient(self, utilities: torch.Tensor, scales: list[float]) -> torch.Tensor:
        """``1/P sum_m u_m (||E_{d_m, i}||^2 / n_i - 1)`` per tensor (the unscaled draws' norms)."""
        dirs = self.directions()
        unique = sorted({d for d, _ in dirs})
        where = {d: j for j, d in enumerate(unique)}
        u_per_dir = torch.zeros(len(unique), dtype=torch.float64)
        for (d, _), u in zip(dirs, utilities.tolist()):
            u_per_dir[where[d]] += u
        out = torch.zeros(len(self.space), dtype=torch.float64)
        with torch.no_grad():
            for i, p in enumerate(self.space.tensors):
                if self.space.lowrank[i]:  # ||A B^T||^2 = tr(A^T A B^T B)
                    a, b = self.space.member_factors(self.noise, i, self.generation, unique)
                    gram = torch.bmm(a.transpose(1, 2), a) * torch.bmm(b.transpose(1, 2), b)
                    sq = gram.sum((1, 2)) / self.rank
                else:
                    e = self.space.member_dense(self.noise, i, self.generation, unique)
                    sq = e.flatten(1).pow(2).sum(1)
                q = sq.double() / (p.numel() * scales[i] ** 2)
                out[i] = (u_per_dir * (q - 1.0)).sum() / self.population
        return out

    def step(self, loss_fn: ModuleLossFn, *batch: Any) -> torch.Tensor:
        """Evaluate the population on ``batch`` and update; returns the members' losses ``(P,)``."""
        losses = self.evaluate(loss_fn, *batch)
        self.update(losses)
        return losses

    # checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Generation, seed, hyperparameters and the outer optimizer's state (plain values)."""
        return {
            "generation": self.generation,
            "seed": self.seed,
            "sigma": self.sigma,
            "population": self.population,
            "rank": self.rank,
            "lr": self.lr,
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "log_scales": self.log_scales.clone(),
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"the saved state has {len(state['optimizers'])} outer optimizer(s), this ES "
                f"{len(self.optimizers)}"
            )
        for key in ("population", "rank"):
            if state[key] != getattr(self, key):
                raise ValueError(f"saved {key}={state[key]} differs from this ES's {getattr(self, key)}")
        self.generation = int(state["generation"])
        self.seed = int(state["seed"])
        self.sigma = float(state["sigma"])
        self.lr = state["lr"]
        if "log_scales" in state:  # (saved before direction sampling existed: plain noise)
            self.log_scales = state["log_scales"].clone().double()
            self.history = [list(h) for h in state["history"]]
        self.noise = self._make_noise()
        self._batched = self._inplace = None
        for opt, saved in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(saved)
