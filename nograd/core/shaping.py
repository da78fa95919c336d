"""Fitness handling shared by every forward-only optimizer.

Convention across nograd: the values passed around are *losses*, lower is better
(as in torch.optim and pycma). Non-finite values are ranked worst and counted;
a generation with no finite value raises :class:`NonFiniteFitnessError` so the
caller can leave the weights untouched.

Shaping turns losses into utilities ``u`` used by ``g = 1/(n sigma) sum_i u_i eps_i``,
with the sign chosen so that ``g`` estimates the gradient of the loss (descend it).

Example:
    >>> import torch
    >>> centered_ranks(torch.tensor([3.0, 1.0, 2.0]))
    tensor([ 0.5000, -0.5000,  0.0000])
"""

from __future__ import annotations

import torch

SHAPINGS = ("centered-ranks", "zscore", "raw")


class NonFiniteFitnessError(ValueError):
    """Raised when a whole generation evaluated to NaN or inf."""


def sanitize(losses: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Replace NaN/inf losses by a value worse than every finite one; return (clean, count)."""
    losses = torch.as_tensor(losses, dtype=torch.float64).flatten()
    finite = torch.isfinite(losses)
    n_bad = int((~finite).sum())
    if n_bad == 0:
        return losses, 0
    if n_bad == losses.numel():
        raise NonFiniteFitnessError(
            f"all {n_bad} fitness values are NaN/inf; the weights were left unchanged "
            "(lower sigma or the learning rate)"
        )
    good = losses[finite]
    worst = good.max() + (good.max() - good.min()).abs() + 1.0
    return torch.where(finite, losses, worst), n_bad


def centered_ranks(losses: torch.Tensor) -> torch.Tensor:
    """Ranks mapped linearly onto [-0.5, 0.5] (Salimans et al. 2017); the worst loss gets +0.5.

    Ties get the mean of their ranks, so equal losses give equal utilities.
    """
    x = torch.as_tensor(losses, dtype=torch.float64).flatten()
    n = x.numel()
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    # average the ranks of tied values
    uniq, inverse = torch.unique(x, return_inverse=True)
    if uniq.numel() < n:
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
        ones = torch.ones(n, dtype=torch.float64)
        counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ones)
        ranks = (sums / counts)[inverse]
    return ranks / (n - 1) - 0.5


def zscore(losses: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std; all-equal values give zeros."""
    x = torch.as_tensor(losses, dtype=torch.float64).flatten()
    if x.numel() == 1:
        return torch.zeros(1, dtype=torch.float64)
    return (x - x.mean()) / (x.std(unbiased=False) + eps)


def shape(losses: torch.Tensor, method: str = "centered-ranks") -> tuple[torch.Tensor, int]:
    """Sanitize then shape losses; returns (utilities as float64, number of non-finite values)."""
    if method not in SHAPINGS:
        raise ValueError(f"fitness shaping must be one of {SHAPINGS}, got {method!r}")
    clean, n_bad = sanitize(losses)
    if method == "centered-ranks":
        return centered_ranks(clean), n_bad
    if method == "zscore":
        return zscore(clean), n_bad
    return clean, n_bad
