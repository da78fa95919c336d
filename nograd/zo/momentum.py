"""ZO-SGD with momentum, with a model-sized buffer or rebuilt from the last steps' seeds."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .base import Record, add_estimate_
from .mezo import SPSAOptimizer

BUFFERS = ("full", "replay")


class ZOMomentum(SPSAOptimizer):
    r"""Zeroth-order SGD with heavy-ball momentum on the SPSA estimate.

    With ``g_hat_t`` the SPSA estimate of :class:`~nograd.zo.MeZO` at step ``t``:

    * ``m_t = beta m_{t-1} + g_hat_t``  (i.e. ``m_t = sum_{j<=t} beta^{t-j} g_hat_j``),
    * ``theta <- theta - lr (m_t + wd * theta)`` (decoupled weight decay, tensors with >= 2 dims;
      it is not folded into ``m`` because the replayed buffer cannot know past weights).

    ``buffer="full"`` keeps ``m`` as a float32 tensor per parameter: **extra memory of one
    model-sized float32 buffer** (4 bytes per trainable parameter).

    ``buffer="replay"`` keeps no model-sized buffer: it stores the seeds and projected
    gradients of the last ``window`` steps (a few numbers each) and applies
    ``m_t = sum_{t-j < window} beta^{t-j} g_hat_j`` by regenerating their noise, tensor by
    tensor. Costs: the momentum is *truncated* (the dropped tail has relative weight
    ``beta^window``, a bias towards recent steps: 0.9^16 = 0.19, 0.9^32 = 0.034, so pick
    ``window`` around ``3 / (1 - beta)``), and each step regenerates ``window x directions``
    noise tensors instead of ``directions``: no extra forward passes, but more RNG work.
    With ``window >= t`` the two buffers give the same weights up to float rounding.

    Example:
        >>> import torch, nograd
        >>> w = torch.tensor([3.0, -2.0], requires_grad=True)
        >>> opt = nograd.ZOMomentum([w], lr=0.01, momentum=0.9, buffer="replay", window=16)
        >>> for _ in range(100):
        ...     loss = opt.step(lambda: float((w ** 2).sum()))
        >>> bool(loss < 1.0)
        True
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict],
        lr: float = 1e-6,
        eps: float = 1e-3,
        momentum: float = 0.9,
        directions: int = 1,
        one_sided: bool = False,
        weight_decay: float = 0.0,
        buffer: str = "full",
        window: int = 32,
        noise_rank: int = 0,
        distribution: str = "gaussian",
        seed: int = 0,
        *,
        log_path: str | os.PathLike | None = None,
        trajectory: Callable[[Record], None] | None = None,
        process_group: Any = None,
    ) -> None:
        if buffer not in BUFFERS:
            raise ValueError(f"buffer must be one of {BUFFERS}, got {buffer!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.buffer = buffer
        self.window = int(window)
        self._history: list[dict[str, Any]] = []
        super().__init__(
            params,
            {"lr": lr, "eps": eps, "weight_decay": weight_decay, "momentum": momentum},
            directions=directions,
            one_sided=one_sided,
            noise_rank=noise_rank,
            distribution=distribution,
            seed=seed,
            log_path=log_path,
            trajectory=trajectory,
            process_group=process_group,
            header_kwargs={"buffer": buffer, "window": self.window},
        )

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        beta = group.get("momentum")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"momentum must be in [0, 1), got {beta!r}")

    def apply_record(self, record: Record) -> None:
        generation = int(record["step"])
        groups = record["groups"]
        coeffs = [self.coefficients(record, j) for j in range(len(groups))]
        with torch.no_grad():
            if self.buffer == "full":
                for i, p in enumerate(self.space.tensors):
                    j = self.group_of[i]
                    h = groups[j]
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    buf = state["momentum_buffer"]
                    buf.mul_(h["momentum"])
                    add_estimate_(self.space, self.noise, i, generation, coeffs[j], 1.0, buf)
                    self.decay_(i, h["lr"], h.get("weight_decay", 0.0), generation)
                    self.add_to_weight_(i, buf, -h["lr"], generation)
                return
            entry = {
                "step": generation,
                "directions": record["directions"],
                "proj_grads": record["proj_grads"],
            }
            self._history = (self._history + [entry])[-self.window :]
            for i, p in enumerate(self.space.tensors):
                j = self.group_of[i]
                h = groups[j]
                self.decay_(i, h["lr"], h.get("weight_decay", 0.0), generation)
                for age, past in enumerate(reversed(self._history)):
                    alpha = -h["lr"] * h["momentum"] ** age
                    add_estimate_(
                        self.space,
                        self.noise,
                        i,
                        int(past["step"]),
                        self.coefficients(past, j),
                        alpha,
                        p.data,
                        kind=age + 2,  # each addition rounded with its own bits
                    )

    def zo_state(self) -> dict[str, Any]:
        return {**super().zo_state(), "buffer": self.buffer, "window": self.window, "history": self._history}

    def load_zo_state(self, state: dict[str, Any]) -> None:
        if state.get("buffer", self.buffer) != self.buffer:
            raise ValueError(
                f"state was saved with buffer={state['buffer']!r}, this optimizer has {self.buffer!r}"
            )
        super().load_zo_state(state)
        self._history = [dict(h) for h in state.get("history", [])][-self.window :]
