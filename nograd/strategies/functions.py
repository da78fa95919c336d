"""Black-box test functions on ``(dim,)`` or ``(popsize, dim)`` tensors (losses, lower is better).

Every function takes ``x`` of shape ``(dim,)`` (returns a 0-d tensor) or ``(popsize, dim)``
(returns ``(popsize,)``), evaluates in the dtype of ``x`` (float64 recommended) and never
modifies its input. Numpy arrays and nested lists are accepted too.

Definitions (``n = dim``, indices from 1):

* ``sphere``:              ``sum_i x_i^2``
* ``separable_ellipsoid``: ``f_elli(x) = sum_i 10^(6 (i-1)/(n-1)) x_i^2`` (condition number 1e6),
  the axis-parallel ellipsoid of Hansen & Ostermeier (2001) and of pycma's ``cma.ff.elli``.
* ``ellipsoid``:           ``f_elli(R x)``, the same ellipsoid in a rotated (non-separable) frame. ``R``
  is a fixed, seeded, permuted block-diagonal orthogonal matrix ``P_1 B P_2`` with blocks of size
  ``min(40, n)`` (the cheap rotations of the bbob-largescale test suite, Varelas et al. 2018, "A
  Comparative Study of Large-Scale Variants of CMA-ES", PPSN), so it stays O(40 n) per evaluation
  in 1e4+ dimensions. For ``n <= 40`` it is a full random rotation. Rotation-invariant methods
  (CMA-ES, LM-MA-ES, Rm-ES) behave identically on both ellipsoids; separable ones do not.
* ``rosenbrock``:          ``sum_{i<n} 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2``, optimum at ``x = 1``.
* ``rastrigin``:           ``10 n + sum_i (x_i^2 - 10 cos(2 pi x_i))``.
* ``cigar``:               ``x_1^2 + 1e6 sum_{i>1} x_i^2``.
* ``discus``:              ``1e6 x_1^2 + sum_{i>1} x_i^2`` (a.k.a. tablet).
* ``ackley``:              ``-20 exp(-0.2 sqrt(mean x^2)) - exp(mean cos(2 pi x)) + 20 + e``.

All have the optimum value 0; ``optimum(name, dim)`` returns ``(x_star, f_star)``.

Example:
    >>> import torch
    >>> float(sphere(torch.ones(3, dtype=torch.float64)))
    3.0
    >>> tuple(rosenbrock(torch.ones(5, 4, dtype=torch.float64)).shape)
    (5,)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch

__all__ = [
    "FUNCTIONS",
    "ackley",
    "cigar",
    "discus",
    "ellipsoid",
    "optimum",
    "rastrigin",
    "rosenbrock",
    "rotation_blocks",
    "separable_ellipsoid",
    "sphere",
]

ROTATION_BLOCK = 40
ROTATION_SEED = 1234


def _as_batch(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    x = torch.as_tensor(x)
    if not torch.is_floating_point(x):
        x = x.to(torch.float64)
    if x.ndim == 1:
        return x.unsqueeze(0), True
    if x.ndim != 2:
        raise ValueError(f"expected x of shape (dim,) or (popsize, dim), got {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError("dim must be at least 1")
    return x, False


def _out(f: torch.Tensor, single: bool) -> torch.Tensor:
    return f[0] if single else f


@lru_cache(maxsize=32)
def _scales64(n: int, cond: float) -> torch.Tensor:
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    return cond ** (torch.arange(n, dtype=torch.float64) / (n - 1))


def _scales(n: int, cond: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _scales64(n, float(cond)).to(device=device, dtype=dtype)


def sphere(x: torch.Tensor) -> torch.Tensor:
    """``sum_i x_i^2``; optimum 0 at 0."""
    xb, single = _as_batch(x)
    return _out(xb.square().sum(1), single)


def separable_ellipsoid(x: torch.Tensor, cond: float = 1e6) -> torch.Tensor:
    """Axis-parallel ``f_elli = sum_i cond^((i-1)/(n-1)) x_i^2``; optimum 0 at 0."""
    xb, single = _as_batch(x)
    return _out((xb.square() * _scales(xb.shape[1], cond, xb.dtype, xb.device)).sum(1), single)


@lru_cache(maxsize=16)
def _rotation(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Permutations p1, p2 and orthogonal blocks (float64, CPU) of ``R = P1 B P2``."""
    g = torch.Generator().manual_seed(seed)
    size = min(ROTATION_BLOCK, n)
    nblocks = -(-n // size)
    blocks = []
    for b in range(nblocks):
        s = min(size, n - b * size)
        q, r = torch.linalg.qr(torch.randn(s, s, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # Haar-distributed orthogonal block
        blocks.append(q)
    p1 = torch.randperm(n, generator=g)
    p2 = torch.randperm(n, generator=g)
    return p1, p2, _stack_blocks(blocks, size), size


def _stack_blocks(blocks: list[torch.Tensor], size: int) -> torch.Tensor:
    # pad the last (smaller) block with an identity to get a (nblocks, size, size) stack
    out = torch.zeros(len(blocks), size, size, dtype=torch.float64)
    for i, q in enumerate(blocks):
        s = q.shape[0]
        out[i, :s, :s] = q
        if s < size:
            out[i, s:, s:] = torch.eye(size - s, dtype=torch.float64)
    return out


def rotation_blocks(n: int, seed: int = ROTATION_SEED) -> torch.Tensor:
    """The dense rotation ``R`` used by :func:`ellipsoid` (for tests and small ``n`` only)."""
    eye = torch.eye(n, dtype=torch.float64)
    return _rotate(eye, seed).T


def _rotate(xb: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows of ``xb`` mapped by ``R = P1 B P2``: ``(R x)`` for each row ``x``."""
    n = xb.shape[1]
    p1, p2, blocks, size = _rotation(n, seed)
    p1, p2 = p1.to(xb.device), p2.to(xb.device)
    blocks = blocks.to(device=xb.device, dtype=xb.dtype)
    y = xb[:, p2]
    nb = blocks.shape[0]
    pad = nb * size - n
    if pad:
        y = torch.cat([y, y.new_zeros(y.shape[0], pad)], 1)
    pop = y.shape[0]
    y = torch.bmm(y.reshape(pop, nb, size).transpose(0, 1), blocks.transpose(1, 2))
    return y.transpose(0, 1).reshape(pop, -1)[:, :n][:, p1]


def ellipsoid(x: torch.Tensor, cond: float = 1e6, seed: int = ROTATION_SEED) -> torch.Tensor:
    """Rotated ellipsoid ``f_elli(R x)`` (non-separable, condition ``cond``); optimum 0 at 0."""
    xb, single = _as_batch(x)
    return _out(separable_ellipsoid(_rotate(xb, seed), cond), single)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """``sum_{i<n} 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2``; optimum 0 at ``(1, ..., 1)``."""
    xb, single = _as_batch(x)
    a, b = xb[:, :-1], xb[:, 1:]
    return _out((100.0 * (b - a.square()).square() + (1.0 - a).square()).sum(1), single)


def rastrigin(x: torch.Tensor) -> torch.Tensor:
    """``10 n + sum_i (x_i^2 - 10 cos(2 pi x_i))``; optimum 0 at 0, ~10^n local optima."""
    xb, single = _as_batch(x)
    n = xb.shape[1]
    return _out(10.0 * n + (xb.square() - 10.0 * torch.cos(2 * math.pi * xb)).sum(1), single)


def cigar(x: torch.Tensor, cond: float = 1e6) -> torch.Tensor:
    """``x_1^2 + cond sum_{i>1} x_i^2``; optimum 0 at 0."""
    xb, single = _as_batch(x)
    sq = xb.square()
    return _out(sq[:, 0] + cond * sq[:, 1:].sum(1), single)


def discus(x: torch.Tensor, cond: float = 1e6) -> torch.Tensor:
    """``cond x_1^2 + sum_{i>1} x_i^2``; optimum 0 at 0."""
    xb, single = _as_batch(x)
    sq = xb.square()
    return _out(cond * sq[:, 0] + sq[:, 1:].sum(1), single)


def ackley(x: torch.Tensor) -> torch.Tensor:
    """``-20 exp(-0.2 sqrt(mean x^2)) - exp(mean cos 2 pi x) + 20 + e``; optimum 0 at 0."""
    xb, single = _as_batch(x)
    a = -20.0 * torch.exp(-0.2 * xb.square().mean(1).sqrt())
    b = -torch.exp(torch.cos(2 * math.pi * xb).mean(1))
    return _out(a + b + 20.0 + math.e, single)


FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sphere": sphere,
    "ellipsoid": ellipsoid,
    "separable-ellipsoid": separable_ellipsoid,
    "rosenbrock": rosenbrock,
    "rastrigin": rastrigin,
    "cigar": cigar,
    "discus": discus,
    "ackley": ackley,
}


def optimum(name: str, dim: int) -> tuple[torch.Tensor, float]:
    """``(x_star, f_star)`` of a function of :data:`FUNCTIONS` in ``dim`` dimensions (float64)."""
    if name not in FUNCTIONS:
        raise ValueError(f"unknown function {name!r}; choose from {sorted(FUNCTIONS)}")
    if dim < 1 or (name == "rosenbrock" and dim < 2):
        raise ValueError(f"{name} needs dim >= {2 if name == 'rosenbrock' else 1}, got {dim}")
    x = (
        torch.ones(dim, dtype=torch.float64)
        if name == "rosenbrock"
        else torch.zeros(dim, dtype=torch.float64)
    )
    return x, 0.0
