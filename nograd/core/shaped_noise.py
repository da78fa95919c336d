"""Seeded noise with the population's directions shaped: per-tensor scales, orthogonal directions
within a generation, and directions drawn from a guiding subspace.

:class:`ShapedNoise` is a :class:`~nograd.core.noise.SeededNoise` whose draws for tensor ``i``
are transformed before any engine sees them, so the batched and in-place engines and
:func:`~nograd.core.engine.accumulate` (which rebuilds the estimate from the seeds) all read the
same shaped directions. Each transform keeps a direction a function of ``(seed, generation,
direction, tensor)`` and the shaping state alone (never of the chunk or process asking), and
the three compose in this order:

1. **Guided directions** (Maheswaranathan et al. 2019, "Guided evolutionary strategies",
   arXiv 1806.10230). Directions ``d >= guided_from`` are drawn from a k-dimensional subspace
   of each tensor instead of the whole space: for a matrix with orthonormal bases ``U`` (out x
   k) and ``V`` (in x k) of the subspace's column and row spaces, the low-rank factors become
   ``A = sqrt(out / k) U z_A`` and ``B = sqrt(in / k) V z_B`` with ``z`` the first ``k`` rows of
   the standard draw, so ``E[||A B^T||^2]`` is unchanged; a vector with basis ``Q`` (n x k) gets
   ``e = sqrt(n / k) Q z``. The perturbation distribution is the paper's mixture of an isotropic
   and a subspace Gaussian, and the estimate ``sum_d c_d E_d`` is its ``Sigma``-weighted gradient.
2. **Orthogonal directions** (Choromanski et al. 2018, "Structured evolution with compact
   architectures for scalable policy optimization", arXiv 1804.02395). The isotropic directions
   of a generation are orthogonalised in blocks: for a low-rank tensor, the larger factor's
   columns over the block's directions (``dim // r`` directions per block, so the Frobenius
   inner products ``<E_d, E_e> = tr(B_d^T B_e A_e^T A_d)`` vanish); for a dense tensor, the
   vectors (``n`` per block). Each orthonormal column is rescaled to the norm of the raw Gaussian
   column it came from, which is independent of its direction, so every direction is still
   exactly Gaussian on its own; only their joint distribution changes.
3. **Per-tensor scales** ``alpha_i``: tensor ``i`` is perturbed by ``sigma alpha_i E_i``. The
   estimate rebuilt from these draws is ``alpha_i`` times the unscaled one, while the smoothed
   loss's gradient is ``1 / alpha_i`` times it; the strategy divides tensor ``i``'s estimate by
   ``alpha_i^2`` (:meth:`ModuleES.update <nograd.strategies.module_es.ModuleES.update>`).

Example:
    >>> noise = ShapedNoise(0, directions=8, orthogonal=True)
    >>> a, b = noise.lowrank_members(16, 4, 1, generation=0, members=range(8), index=0)
    >>> gram = torch.einsum("kor,jor->kj", a, a)
    >>> bool((gram - torch.diag(gram.diagonal())).abs().max() < 1e-4)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from .noise import SeededNoise, split_factors

Guide = tuple[torch.Tensor, ...]
"""A tensor's guiding subspace: ``(U, V)`` for a low-rank matrix, ``(Q,)`` for a dense tensor."""
Draw = Callable[[range], torch.Tensor]
"""Directions -> their raw draws (k, dim, r) for one tensor."""


class ShapedNoise(SeededNoise):
    """Seeded noise with guided, orthogonal and per-tensor-scaled directions (module docstring).

    Args:
        seed, distribution, threads: as :class:`~nograd.core.noise.SeededNoise`.
        directions: directions per generation (``P / 2`` for an antithetic population of ``P``);
            fixes the orthogonal blocks and where the guided directions start.
        orthogonal: orthogonalise the isotropic directions of a generation in blocks.
        guided: number of directions (the last ones, ``d >= directions - guided``) drawn from
            each tensor's guide once :attr:`guides` holds one.

    Attributes:
        scales: tensor index -> ``alpha_i`` (missing: 1).
        guides: tensor index -> :data:`Guide`, set by the strategy between generations.
    """

    def __init__(
        self,
        seed: int = 0,
        distribution: str = "gaussian",
        threads: int | None = None,
        *,
        directions: int,
        orthogonal: bool = False,
        guided: int = 0,
    ) -> None:
        if directions < 1:
            raise ValueError(f"directions must be >= 1, got {directions}")
        if not 0 <= guided < directions:
            raise ValueError(f"guided must be in [0, {directions}) directions, got {guided}")
        super().__init__(seed, distribution, threads)
        self.directions = int(directions)
        self.orthogonal = bool(orthogonal)
        self.guided = int(guided)
        self.scales: dict[int, float] = {}
        self.guides: dict[int, Guide] = {}
        self._blocks: dict[tuple, torch.Tensor] = {}  # orthogonalised blocks of the current generation
        self._blocks_generation: int | None = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        extra = {"directions": self.directions, "orthogonal": self.orthogonal, "guided": self.guided}
        return {**state, **extra, "scales": dict(self.scales), "guides": dict(self.guides)}

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        scales, guides = state.pop("scales", {}), state.pop("guides", {})
        self.__init__(**state)
        self.scales, self.guides = scales, guides

    @property
    def guided_from(self) -> int:
        """The first guided direction (``directions`` when none is)."""
        return self.directions - self.guided

    def shapes(self, index: int) -> bool:
        """Whether tensor ``index``'s draws are transformed at all."""
        return self.orthogonal or index in self.guides or self.scales.get(index, 1.0) != 1.0

    def reads_in_place(self, index: int) -> bool:
        """A shaped tensor's directions are computed from its draws, never the table's slices as
        they lie."""
        return super().reads_in_place(index) and not self.shapes(index)

    def member_blocks(
        self,
        n: int,
        generation: int,
        member: int,
        index: int,
        device: torch.device | str = "cpu",
        scratch: torch.Tensor | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """A shaped direction in one block, the whole of it (a projection or a block's QR needs the
        whole tensor), so what reads blocks (``add_``, ``accumulate_``, ``affine_members_``) reads it
        shaped."""
        if not self.shapes(index):
            yield from super().member_blocks(n, generation, member, index, device, scratch)
            return
        yield 0, self.full((n,), generation=generation, member=member, index=index, device=device)

    # the transforms --------------------------------------------------------------------------
    def _orthogonal_block(self, key: tuple, generation: int, draw: Draw, block: range) -> torch.Tensor:
        """The block's raw directions (k, dim, r) orthogonalised over all k*r columns, each rescaled
        to its raw norm; cached for the generation (evaluation and update read it twice)."""
        if self._blocks_generation != generation:
            self._blocks, self._blocks_generation = {}, generation
        if key not in self._blocks:
            full = draw(block)  # (k, dim, r) of the whole block, whoever asks
            k, dim, r = full.shape
            cols = full.permute(1, 0, 2).reshape(dim, k * r).double()
            q, rr = torch.linalg.qr(cols)
            q = q * torch.sign(torch.diagonal(rr)).unsqueeze(0)  # a unique Q: columns follow their raw ones
            q = q * cols.norm(dim=0, keepdim=True)
            self._blocks[key] = q.float().reshape(dim, k, r).permute(1, 0, 2).contiguous()
        return self._blocks[key]

    def _orthogonalise(
        self, stack: torch.Tensor, ids: list[int], index: int, generation: int, tag: str, draw: Draw
    ) -> torch.Tensor:
        """Replace the isotropic directions' rows of ``stack`` (len(ids), dim, r) by their block's
        orthogonalised ones."""
        dim, r = stack.shape[1], stack.shape[2]
        isotropic = self.guided_from
        per_block = min(dim // r, isotropic)
        if per_block < 2:  # one direction per block: nothing to orthogonalise against
            return stack
        out = stack.clone()
        for pos, d in enumerate(ids):
            if d >= isotropic:
                continue
            b = d // per_block
            block = range(b * per_block, min((b + 1) * per_block, isotropic))
            q = self._orthogonal_block((tag, index, b, dim, r), generation, draw, block)
            out[pos] = q[d - block.start]
        return out

    @staticmethod
    def _project(z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """``sqrt(dim / k) basis z[:k]`` for each direction: (cnt, dim, r) -> (cnt, dim, r)."""
        dim, k = basis.shape
        return torch.einsum("dk,ckr->cdr", basis.to(z), z[:, :k]).mul_(math.sqrt(dim / k))

    def _guide_rows(self, stacks: list[torch.Tensor], ids: list[int], index: int) -> list[torch.Tensor]:
        guide = self.guides.get(index)
        rows = [pos for pos, d in enumerate(ids) if d >= self.guided_from]
        if guide is None or not rows:
            return stacks
        where = torch.tensor(rows, device=stacks[0].device)
        out = []
        for stack, basis in zip(stacks, guide):
            stack = stack.clone()
            stack[where] = self._project(stack[where], basis.to(stack.device))
            out.append(stack)
        return out

    # SeededNoise's draws, shaped ---------------------------------------------------------------
    def lowrank_members(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        *,
        generation: int,
        members: list[int] | range,
        index: int,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = list(members)

        def raw(dirs: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
            # SeededNoise's factors, drawn through its own members() (this class shapes that one too)
            shape = ((out_features + in_features) * rank,)
            flat = SeededNoise.members(
                self, shape, generation=generation, members=dirs, index=index, device=device
            )
            return split_factors(flat, out_features, in_features, rank)

        a, b = raw(ids)
        if not self.shapes(index):
            return a, b
        a, b = self._guide_rows([a, b], ids, index)
        if self.orthogonal:
            side = 0 if out_features >= in_features else 1  # the larger factor holds more directions
            shaped = self._orthogonalise(
                (a, b)[side], ids, index, generation, "lowrank", lambda block: raw(list(block))[side]
            )
            a, b = (shaped, b) if side == 0 else (a, shaped)
        alpha = self.scales.get(index, 1.0)
        return (a * alpha if alpha != 1.0 else a), b

    def members(
        self,
        shape: torch.Size | tuple[int, ...],
        *,
        generation: int,
        members: list[int] | range,
        index: int,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        ids = list(members)
        shape = torch.Size(shape)

        def raw(dirs: Sequence[int]) -> torch.Tensor:
            flat = SeededNoise.members(
                self, shape, generation=generation, members=dirs, index=index, device=device
            )
            return flat.reshape(len(dirs), -1, 1)

        if not self.shapes(index):
            return raw(ids).view(len(ids), *shape)
        (z,) = self._guide_rows([raw(ids)], ids, index)
        if self.orthogonal:
            z = self._orthogonalise(z, ids, index, generation, "dense", lambda block: raw(list(block)))
        alpha = self.scales.get(index, 1.0)
        return (z * alpha if alpha != 1.0 else z).view(len(ids), *shape)

    def full(
        self,
        shape: torch.Size | tuple[int, ...],
        *,
        generation: int,
        member: int,
        index: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        if not self.shapes(index):
            return super().full(
                shape, generation=generation, member=member, index=index, device=device, dtype=dtype
            )
        return self.members(shape, generation=generation, members=[member], index=index, device=device)[0].to(
            dtype
        )

    def full_chunks(
        self,
        numel: int,
        *,
        generation: int,
        member: int,
        index: int,
        chunk_blocks: int = 4,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[int, torch.Tensor]]:
        if not self.shapes(index):
            yield from super().full_chunks(
                numel,
                generation=generation,
                member=member,
                index=index,
                chunk_blocks=chunk_blocks,
                device=device,
            )
            return
        # a shaped direction depends on the whole tensor (a projection, a block's QR): drawn whole
        yield 0, self.full((numel,), generation=generation, member=member, index=index, device=device)
