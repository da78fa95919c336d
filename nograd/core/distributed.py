"""A population shared between processes: each rank evaluates its share, one all-gather of the
losses, and every rank computes the same update from the seeds, so no weights travel.

This is the scheme of Salimans et al. 2017 (arXiv 1703.03864, section 2.1): workers that can
rebuild every perturbation from its seed need to exchange only scalars. With P members (or n
ZO directions) on N ranks, rank r evaluates the contiguous block ``shares(P, N)[r]`` and one
``all_gather`` of P losses gives every rank the whole generation. Antithetic pairs stay on one
rank (shares are cut in whole pairs). Every rank then runs the single-process update on the same
numbers, so with the same settings N processes give the weights of one process bit for bit
(fp32 on CPU; this module's tests check it).

:class:`Collective` wraps a ``torch.distributed`` process group (``None``: one process, where
every call is a no-op). The algorithms take it as ``process_group=`` (a torch ``ProcessGroup``,
e.g. ``torch.distributed.group.WORLD`` after ``init_process_group``).

Example (one process: the whole population is this rank's share):
    >>> c = Collective(None)
    >>> c.rank, c.world_size, c.share(8, unit=2)
    (0, 1, range(0, 8))
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch
import torch.distributed as dist

from nograd.core.errors import RunAborted, first_line


def _reason(e: BaseException) -> str:
    """The first sentence of a backend error, without its source-file prefix."""
    text = first_line(e, limit=10_000)
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[.../gloo/transport/tcp/pair.cc:537] "
    return text.split(". ")[0][:160]


def default_group() -> Any:
    """The default process group when ``torch.distributed`` runs more than one process, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def shares(n: int, world_size: int, unit: int = 1) -> list[range]:
    """Contiguous, balanced blocks of ``range(n)`` for each rank, cut at multiples of ``unit``."""
    if n % unit:
        raise ValueError(f"{n} items do not split into whole units of {unit}")
    units = n // unit
    return [
        range(unit * (units * r // world_size), unit * (units * (r + 1) // world_size))
        for r in range(world_size)
    ]


class Collective:
    """The ranks of one process group, as the population methods use them.

    ``bytes_sent`` counts the payload this rank puts on the wire: a ring all-gather of a
    ``s``-byte share sends ``s (N - 1)`` bytes from every rank. ``Collective.sent_total`` adds
    up every instance's (and :meth:`count_sent`'s) in this process.
    """

    sent_total = 0

    @classmethod
    def count_sent(cls, n: int) -> None:
        """Count ``n`` bytes sent by a collective that runs elsewhere (DDP's gradient all-reduce)."""
        cls.sent_total += n

    def __init__(self, process_group: Any = None) -> None:
        self.group = process_group
        if process_group is None:
            self.rank, self.world_size = 0, 1
        else:
            self.rank = dist.get_rank(process_group)
            self.world_size = dist.get_world_size(process_group)
        self.bytes_sent = 0

    def _sent(self, n: int) -> None:
        self.bytes_sent += n
        Collective.sent_total += n

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def share(self, n: int, unit: int = 1) -> range:
        """This rank's block of ``range(n)`` (whole units of ``unit``)."""
        return shares(n, self.world_size, unit)[self.rank]

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _call(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args, group=self.group)
        except RuntimeError as e:  # gloo/nccl: a peer closed the connection or the timeout passed
            first = _reason(e)
            raise RunAborted(
                f"rank {self.rank} of {self.world_size} lost contact with the other processes during {what} "
                f"({first}); resume from the last checkpoint with --resume",
                exit_now=True,
            ) from None

    def gather(self, local: torch.Tensor, n: int, unit: int = 1) -> torch.Tensor:
        """Every rank's share (rows ``share(n, unit)`` of a ``(n, ...)`` tensor) -> the whole, in order."""
        if not self.active:
            return local
        blocks = shares(n, self.world_size, unit)
        if local.shape[0] != len(blocks[self.rank]):
            raise ValueError(
                f"rank {self.rank} holds {local.shape[0]} rows, its share is {len(blocks[self.rank])}"
            )
        rows = max(len(b) for b in blocks)
        padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=self._device())
        padded[: local.shape[0]] = local.to(padded.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._call("all_gather", dist.all_gather, parts, padded)
        self._sent(padded.numel() * padded.element_size() * (self.world_size - 1))
        return torch.cat([p[: len(b)] for p, b in zip(parts, blocks)]).to(local.device)

    def max(self, value: float) -> float:
        """The largest ``value`` over the ranks (so that every rank takes the same decision)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        self._call("all_reduce", dist.all_reduce, t, dist.ReduceOp.MAX)
        self._sent(round(8 * 2 * (self.world_size - 1) / self.world_size))  # ring all-reduce
        return float(t.item())

    def barrier(self) -> None:
        if self.active:
            self._call("barrier", lambda group: dist.barrier(group=group))

    def check_same(self, tensors: list[torch.Tensor], what: str = "weights") -> None:
        """Compare a sha256 of ``tensors`` between the ranks; a mismatch raises :class:`RunAborted`."""
        if not self.active:
            return
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        mine = torch.tensor([int.from_bytes(h.digest()[:8], "little", signed=True)], dtype=torch.int64)
        every = self.gather(mine, self.world_size)
        if not bool((every == every[0]).all()):
            differ = [r for r in range(self.world_size) if every[r] != every[0]]
            raise RunAborted(
                f"the processes' {what} differ (ranks {differ} against rank 0): the ranks no longer compute "
                "the same update (different code, settings or hardware); stopping"
            )
