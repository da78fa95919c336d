"""What the optimizers of this package share: torch.optim's closure protocol and argument checks."""

from __future__ import annotations

from collections.abc import Callable

import torch


def call_closure(closure: Callable[[], float] | None) -> float | None:
    """torch.optim's ``step(closure)``: re-evaluate the loss with gradients on; None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def check_lr_betas(lr: float, betas: tuple[float, ...]) -> None:
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"betas must be in [0, 1), got {betas}")
