"""Gradient estimators from forward passes: seeded noise in, a gradient estimate out.

Each estimator can be used on its own: ``estimate(closure)`` writes its estimate into the
``.grad`` of the trainable tensors, so any ``torch.optim`` optimizer takes the step::

    >>> import torch, nograd
    >>> model = torch.nn.Linear(4, 1)
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> est = nograd.zo.SPSAEstimator(model, eps=1e-3, directions=4)
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    >>> loss = est.estimate(lambda: torch.nn.functional.mse_loss(model(x), y))
    >>> opt.step()

The optimizers of :mod:`nograd.zo` compose the same estimators with their own update rules.

* :class:`SPSAEstimator` - SPSA (Spall 1992) as used by MeZO (Malladi et al. 2023, arXiv
  2305.17333): ``g_hat = (1/n) sum_k (L(theta + eps z_k) - L(theta - eps z_k)) / (2 eps) z_k``,
  or the one-sided ``(L(theta + eps z_k) - L(theta)) / eps``. Unbiased for the gradient of the
  Gaussian-smoothed loss ``E_z L(theta + eps z)`` (two-sided). Extra memory: none beyond one
  module's parameters during a perturbed forward (:class:`~nograd.core.engine.InPlacePerturbation`).
* :class:`HiZOOEstimator` - HiZOO's Hessian-preconditioned SPSA (Zhao et al. 2024, arXiv
  2402.15173, see :mod:`nograd.zo.hizoo`). Extra memory: one float32 diagonal per parameter.
* :class:`ForwardGradientEstimator` - forward gradients (Baydin et al. 2022, arXiv 2202.08587):
  ``g = (1/k) sum_k (grad f . v_k) v_k`` with ``grad f . v`` from one ``torch.func.jvp``.
  Extra memory: one model-sized tangent plus the dual forward's activations.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..core.distributed import Collective
from ..core.engine import InPlacePerturbation, ParamSpace, accumulate
from ..core.noise import SeededNoise
from ..core.shaping import NonFiniteFitnessError
from .base import Closure, Evaluation, ScaledView, check_common, check_int, check_positive, to_float


class ZONonFiniteError(NonFiniteFitnessError):
    """Every direction of a step gave a NaN/inf loss; nothing was changed. ``.nonfinite`` counts them."""

    def __init__(self, message: str, nonfinite: int, forwards: int = 0) -> None:
        super().__init__(message)
        self.nonfinite = nonfinite
        self.forwards = forwards  # forward passes spent before giving up


def _space(params: Any, noise_rank: int) -> ParamSpace:
    return params if isinstance(params, ParamSpace) else ParamSpace(params, rank=noise_rank)


class _SeededEstimator:
    """What every estimator shares: a step counter keying the noise, the ``.grad`` write, the state.

    ``collective`` shares the directions between processes (:mod:`nograd.core.distributed`):
    each rank evaluates its block and the losses are all-gathered, so every rank writes the
    same estimate. Set it with ``process_group=`` (or :meth:`distribute`).
    """

    space: Any
    noise: SeededNoise
    step_count: int
    last_info: dict[str, float]
    collective: Collective = Collective(None)

    def distribute(self, process_group: Any) -> None:
        """Share the directions of each estimate with the ranks of ``process_group`` (None: alone)."""
        self.collective = Collective(process_group)

    @property
    def seed(self) -> int:
        return self.noise.seed

    def evaluate(self, objective: Any, generation: int) -> Evaluation:  # pragma: no cover
        raise NotImplementedError

    def coefficients(self, evaluation: Evaluation) -> list[tuple[int, float]]:  # pragma: no cover
        raise NotImplementedError

    def estimate(self, objective: Any) -> float:
        """Write the estimate into each trainable tensor's ``.grad``; return the loss."""
        generation = self.step_count
        try:
            ev = self.evaluate(objective, generation)
        except NonFiniteFitnessError:
            self.step_count += 1
            raise
        accumulate(self.space, self.noise, generation, self.coefficients(ev), into="grad")
        self.step_count += 1
        self.last_info = {"loss": ev.loss, "nonfinite": float(ev.nonfinite), "forwards": float(ev.forwards)}
        return ev.loss

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "seed": self.noise.seed, "distribution": self.noise.distribution}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.use_noise(SeededNoise(int(state["seed"]), str(state["distribution"])))

    def use_noise(self, noise: SeededNoise) -> None:
        self.noise = noise


class SPSAEstimator(_SeededEstimator):
    """SPSA / MeZO gradient estimate from 2n (two-sided) or n+1 (one-sided) forward passes.

    Args:
        params: a module, an iterable of tensors or param groups, or a :class:`ParamSpace`. Only
            tensors with ``requires_grad=True`` are perturbed (LoRA: the adapters only).
        eps: perturbation size.
        directions: number ``n`` of random directions averaged per estimate.
        one_sided: use ``(L(theta + eps z) - L(theta)) / eps`` (n+1 forwards) instead of the
            central difference (2n forwards).
        noise_rank: 0 for dense Gaussian/Rademacher noise; ``r > 0`` perturbs matrices with
            low-rank ``A B^T / sqrt(r)`` noise (EGGROLL), cheaper to regenerate.
        distribution: ``"gaussian"``, ``"rademacher"``, ``"gaussian-table"`` or ``"gaussian-counter"``
            (faster, see ``nograd.core.noise``).
        seed: noise seed; direction ``k`` of estimate ``t`` is keyed by ``(seed, t, k)``.
        module: map each tensor to the module that registers it instead of running a discovery
            forward. By default the first estimate runs the closure once unperturbed to learn which
            modules' forwards use which tensors (robust to tied weights and to parameters used
            outside their module, which are then perturbed for the whole evaluation); that forward
            is counted in ``last_info["forwards"]`` and gives ``L(theta)`` for one-sided estimates.

    ``estimate(closure)`` returns the loss (``L(theta)`` when the estimate needs it, else the mean
    of the finite perturbed losses, so the value does not depend on whether a discovery ran) and
    writes the estimate into ``.grad``. Directions with a NaN/inf loss are skipped (counted in
    ``last_info["nonfinite"]``); if none is left a :class:`ZONonFiniteError` is raised and no
    ``.grad`` is written.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> est = SPSAEstimator(model, eps=1e-3, directions=2, seed=0)
        >>> x = torch.randn(8, 3)
        >>> loss = est.estimate(lambda: model(x).pow(2).mean())
        >>> model.weight.grad.shape
        torch.Size([1, 3])
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict] | ParamSpace,
        eps: float = 1e-3,
        directions: int = 1,
        one_sided: bool = False,
        noise_rank: int = 0,
        distribution: str = "gaussian",
        seed: int = 0,
        module: nn.Module | None = None,
    ) -> None:
        check_positive("eps", eps)
        self.directions = check_int("directions", directions, 1)
        check_common(noise_rank, distribution, seed)
        self.eps = float(eps)
        self.one_sided = bool(one_sided)
        self.space = _space(params, noise_rank)
        self.noise = SeededNoise(seed, distribution)
        self.view = ScaledView(self.space)
        self.view.module = None  # discovery unless a module is given explicitly
        self.perturbation = InPlacePerturbation(self.view, self.noise, module=module)  # type: ignore[arg-type]
        self.step_count = 0
        self.last_info: dict[str, float] = {}

    def _loss_at(self, closure: Closure, generation: int, direction: int, sign: float) -> float:
        with torch.no_grad(), self.perturbation.apply(generation, direction, sign):
            return to_float(closure())

    def _direction_losses(self, closure: Closure, generation: int) -> list[tuple[float, float]]:
        """``(L+, L-)`` of every direction (``L-`` is NaN one-sided); with a process group each
        rank evaluates its block of directions and the pairs are all-gathered."""
        mine = []
        for k in self.collective.share(self.directions):
            lp = self._loss_at(closure, generation, k, 1.0)
            lm = math.nan if self.one_sided else self._loss_at(closure, generation, k, -1.0)
            mine.append((lp, lm))
        local = torch.tensor(mine, dtype=torch.float64).reshape(-1, 2)
        return [(float(a), float(b)) for a, b in self.collective.gather(local, self.directions).tolist()]

    def _center(self, closure: Closure) -> float:
        if self.perturbation.needs_discovery:
            return to_float(self.perturbation.discover(closure))
        with torch.no_grad():
            return to_float(closure())

    def evaluate(
        self,
        closure: Closure,
        generation: int,
        *,
        eps: float | Sequence[float] | None = None,
        hessian: Sequence[torch.Tensor] | None = None,
        center: bool | None = None,
        curvature: bool = False,
    ) -> Evaluation:
        """Run the forward passes of one estimate; the weights are the same afterwards, bit for bit.

        ``eps`` overrides the perturbation size, globally or per tensor (param groups);
        ``hessian`` (per tensor) makes the perturbation ``eps z / sqrt(hessian)``;
        ``center`` forces the evaluation of ``L(theta)``; ``curvature`` also returns
        ``L+ + L- - 2 L0`` per direction (implies ``center``).
        """
        scale = self.eps if eps is None else eps
        self.view.scales = (
            [float(scale)] * len(self.space) if isinstance(scale, (int, float)) else list(scale)
        )
        self.view.hessian = hessian
        need_center = self.one_sided or curvature or bool(center)
        forwards = 0
        l0: float | None = None
        try:
            if need_center or self.perturbation.needs_discovery:
                l0 = self._center(closure)
                forwards += 1
            if need_center and not math.isfinite(l0):  # type: ignore[arg-type]
                self.last_info = {"nonfinite": float(self.directions)}
                raise ZONonFiniteError(
                    f"the unperturbed loss is NaN/inf ({l0}); the weights were left unchanged",
                    self.directions,
                )
            dirs: list[int] = []
            diffs: list[float] = []
            curv: list[float] = []
            finite_losses: list[float] = []
            bad = 0
            for k, (lp, lm) in enumerate(self._direction_losses(closure, generation)):
                forwards += 1 if self.one_sided else 2
                if self.one_sided:
                    ok, diff = math.isfinite(lp), lp - l0  # type: ignore[operator]
                    vals = [lp]
                else:
                    vals = [lp, lm]
                    ok, diff = math.isfinite(lp) and math.isfinite(lm), (lp - lm) / 2.0
                finite_losses += [v for v in vals if math.isfinite(v)]
                if not ok:
                    bad += 1
                    continue
                dirs.append(k)
                diffs.append(diff)
                if curvature:
                    curv.append(lp + lm - 2.0 * l0)  # type: ignore[operator]
        finally:
            self.view.hessian = None
        if not dirs:
            self.last_info = {"nonfinite": float(bad)}
            raise ZONonFiniteError(
                f"all {bad} directions gave NaN/inf losses; the weights were left unchanged "
                "(lower eps or the learning rate)",
                bad,
                forwards,
            )
        loss = l0 if need_center else sum(finite_losses) / len(finite_losses)
        return Evaluation(dirs, diffs, loss, bad, forwards, l0, curv if curvature else None)

    def coefficients(self, evaluation: Evaluation, eps: float | None = None) -> list[tuple[int, float]]:
        """``(direction, diff_k / (eps n))``: the estimate is ``sum_k c_k z_k``."""
        e = self.eps if eps is None else eps
        n = len(evaluation.directions)
        return [(d, diff / e / n) for d, diff in zip(evaluation.directions, evaluation.diffs)]

    def use_noise(self, noise: SeededNoise) -> None:
        self.noise = self.perturbation.noise = noise


# ------------------------------------------------------------------------------------ HiZOO


def hizoo_tensor_update(
    space: ParamSpace,
    noise: SeededNoise,
    i: int,
    generation: int,
    hessian: torch.Tensor,
    grad_coeffs: Sequence[tuple[int, float]],
    curv_coeffs: Sequence[float],
    smooth: float,
) -> torch.Tensor:
    """One HiZOO step for tensor ``i``: update its diagonal Hessian in place, return the direction.

    With ``D = Sigma^{-1}`` (``hessian``, float32) and the directions ``u_k`` of this step:

    * ``H_hat = sum_k b_k D (u_k^2 - 1)`` with ``b_k = (L+ + L- - 2 L0) / (2 mu^2 n)``,
    * ``D <- (1 - alpha) D + alpha |H_hat|``,
    * returns ``sum_k c_k u_k / sqrt(D)`` with ``c_k = g_k / n`` (the new ``D``).
    """
    acc_g = torch.zeros(hessian.shape, dtype=torch.float32, device=hessian.device)
    acc_h = torch.zeros_like(acc_g)
    for (d, cg), ch in zip(grad_coeffs, curv_coeffs):
        e = space.dense(noise, i, generation, d)
        acc_g.add_(e, alpha=cg)
        acc_h.add_(e.square_().sub_(1.0), alpha=ch)
    acc_h.mul_(hessian).abs_()
    hessian.mul_(1.0 - smooth).add_(acc_h, alpha=smooth)
    return acc_g.div_(hessian.sqrt())


def check_hizoo(noise_rank: int, distribution: str, hessian_smooth: float) -> None:
    check_positive("hessian_smooth", hessian_smooth)
    if hessian_smooth > 1:
        raise ValueError(f"hessian_smooth must be in (0, 1], got {hessian_smooth}")
    if distribution != "gaussian":
        raise ValueError(
            "HiZOO needs Gaussian noise: its Hessian estimate uses u**2 - 1, which is 0 for Rademacher noise"
        )
    if noise_rank:
        raise ValueError("HiZOO's diagonal Hessian estimate needs dense noise (noise_rank=0)")


class HiZOOEstimator(SPSAEstimator):
    """HiZOO's preconditioned estimate ``g/sqrt(D)`` written into ``.grad`` (the diagonal ``D`` is kept here).

    Three forward passes per direction pair: ``L(theta)``, ``L(theta + mu u / sqrt(D))`` and
    ``L(theta - mu u / sqrt(D))``; see :class:`nograd.zo.HiZOO` for the equations. Extra memory:
    one float32 tensor per trainable parameter (the diagonal Hessian estimate).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> est = HiZOOEstimator(model, eps=1e-3, hessian_smooth=1e-3)
        >>> loss = est.estimate(lambda: model(torch.ones(2, 3)).pow(2).mean())
        >>> float(est.hessian[0].min()) > 0
        True
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict] | ParamSpace,
        eps: float = 1e-3,
        directions: int = 1,
        hessian_smooth: float = 1e-6,
        seed: int = 0,
        module: nn.Module | None = None,
    ) -> None:
        check_hizoo(0, "gaussian", hessian_smooth)
        super().__init__(params, eps=eps, directions=directions, seed=seed, module=module)
        self.hessian_smooth = float(hessian_smooth)
        self.hessian = [torch.ones(p.shape, dtype=torch.float32, device=p.device) for p in self.space.tensors]

    def estimate(self, closure: Closure) -> float:
        generation = self.step_count
        try:
            ev = self.evaluate(closure, generation, hessian=self.hessian, curvature=True)
        except NonFiniteFitnessError:
            self.step_count += 1
            raise
        n = len(ev.directions)
        coeffs = self.coefficients(ev)
        curv = [c / (2.0 * self.eps**2 * n) for c in ev.curvature]  # type: ignore[union-attr]
        with torch.no_grad():
            for i, p in enumerate(self.space.tensors):
                g = hizoo_tensor_update(
                    self.space, self.noise, i, generation, self.hessian[i], coeffs, curv, self.hessian_smooth
                )
                p.grad = g.to(p.dtype)
        self.step_count += 1
        self.last_info = {"loss": ev.loss, "nonfinite": float(ev.nonfinite), "forwards": float(ev.forwards)}
        return ev.loss

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "hessian": [h.clone() for h in self.hessian]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for h, saved in zip(self.hessian, state["hessian"], strict=True):
            h.copy_(saved)


# ------------------------------------------------------------------------- forward gradients


class _Caller(nn.Module):
    """Runs ``fn(inner)``; lets ``functional_call`` swap ``inner``'s parameters for dual tensors."""

    def __init__(self, inner: nn.Module, fn: Callable[[nn.Module], Any]) -> None:
        super().__init__()
        self.inner = inner
        self.fn = fn

    def forward(self) -> Any:
        return self.fn(self.inner)


class ForwardGradientEstimator(_SeededEstimator):
    """Forward gradient ``g = (1/k) sum_k (grad f . v_k) v_k`` (Baydin et al. 2022, arXiv 2202.08587).

    ``grad f . v`` is computed exactly (to float precision) by forward-mode AD:
    ``torch.func.jvp`` over ``torch.func.functional_call``, so no backward pass and no stored
    activations. Unbiased for ``grad f`` since ``E[v v^T] = I``.

    ``fn`` receives the module (its trainable parameters temporarily replaced by dual tensors,
    so ``fn = lambda m: loss(m(x), y)``) when the estimator was built from a module, else the
    list of trainable tensors (``fn = lambda ps: f(*ps)``). Every operation in ``fn`` needs a
    forward-AD formula (the fused ``scaled_dot_product_attention`` kernels have none: use the
    GPT's ``attention="math"``).

    Cost per tangent: one ``jvp``, about 3 forward-equivalents (the tangent pass does two
    matmuls per linear layer, like a backward). Extra memory: one model-sized tangent (the
    parameter dtype) plus the tangents of the activations of the layer being computed.

    Example:
        >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
        >>> est = ForwardGradientEstimator([w], tangents=8)
        >>> loss = est.estimate(lambda ps: (ps[0] ** 2).sum())
        >>> w.grad.shape
        torch.Size([2])
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict] | ParamSpace,
        tangents: int = 1,
        noise_rank: int = 0,
        distribution: str = "gaussian",
        seed: int = 0,
        module: nn.Module | None = None,
    ) -> None:
        self.tangents = check_int("tangents", tangents, 1)
        check_common(noise_rank, distribution, seed)
        self.space = _space(params, noise_rank)
        self.module = module if module is not None else self.space.module
        self.noise = SeededNoise(seed, distribution)
        self.names: list[str] | None = None
        if self.module is not None:
            by_id = {id(p): n for n, p in self.module.named_parameters()}
            missing = [i for i, p in enumerate(self.space.tensors) if id(p) not in by_id]
            if missing:
                raise ValueError("every trainable tensor must be a parameter of the module")
            self.names = ["inner." + by_id[id(p)] for p in self.space.tensors]
        self.step_count = 0
        self.last_info: dict[str, float] = {}

    def _function(self, fn: Callable[[Any], Any]) -> Callable[..., torch.Tensor]:
        if self.module is None:

            def f(*flat: torch.Tensor) -> torch.Tensor:
                return _as_scalar(fn(list(flat)))

            return f
        caller = _Caller(self.module, fn)
        names = self.names

        def g(*flat: torch.Tensor) -> torch.Tensor:
            return _as_scalar(torch.func.functional_call(caller, dict(zip(names, flat)), ()))  # type: ignore[arg-type]

        return g

    def evaluate(self, fn: Callable[[Any], Any], generation: int) -> Evaluation:
        """``k`` jvps: the directional derivatives ``grad f . v_k`` (``diffs``) and ``f(theta)``."""
        f = self._function(fn)
        primals = tuple(p.detach() for p in self.space.tensors)
        mine = []
        for k in self.collective.share(self.tangents):
            tangent = tuple(
                self.space.dense(self.noise, i, generation, k).to(p.dtype) for i, p in enumerate(primals)
            )
            with warnings.catch_warnings():  # torch's own one-time jit use when forward AD loads
                warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
                out, dd = torch.func.jvp(f, primals, tangent)
            mine.append((to_float(out), to_float(dd)))
            del tangent
        local = torch.tensor(mine, dtype=torch.float64).reshape(-1, 2)
        dirs: list[int] = []
        derivs: list[float] = []
        loss: float | None = None
        bad = 0
        for k, (value, deriv) in enumerate(self.collective.gather(local, self.tangents).tolist()):
            if math.isfinite(value):
                loss = value
            if not (math.isfinite(value) and math.isfinite(deriv)):
                bad += 1
                continue
            dirs.append(k)
            derivs.append(deriv)
        if not dirs:
            self.last_info = {"nonfinite": float(bad)}
            raise ZONonFiniteError(
                f"all {bad} tangents gave NaN/inf values; the weights were left unchanged", bad
            )
        return Evaluation(dirs, derivs, loss, bad, 3 * self.tangents, loss)  # type: ignore[arg-type]

    def coefficients(self, evaluation: Evaluation) -> list[tuple[int, float]]:
        n = len(evaluation.directions)
        return [(d, v / n) for d, v in zip(evaluation.directions, evaluation.diffs)]


def _as_scalar(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError("the forward-gradient function must return a one-element loss tensor")
    return value.reshape(())
