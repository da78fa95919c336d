"""Perturb a model and evaluate it: the engine under every forward-only optimizer.

Three pieces, all driven by :class:`~nograd.core.noise.SeededNoise` so no population is ever stored:

* :class:`ParamSpace` - the trainable tensors (``requires_grad=True``), each with a stable index
  and a perturbation kind: low-rank ``E = A B^T / sqrt(r)`` for matrices when ``rank > 0``
  (EGGROLL, arXiv 2511.16652), dense noise otherwise.
* :class:`InPlacePerturbation` - evaluate one member at *inference memory* (MeZO's trick,
  arXiv 2305.17333). Each module's own parameters are perturbed when its forward starts and
  copied back when it ends, so the restore is bit-exact in every dtype and the extra memory is
  one module's parameters at a time, never the model.
* :class:`BatchedPerturbation` - evaluate ``P`` members in one forward at inference throughput
  (EGGROLL): the batch is member-major (``P * b`` rows) and forward hooks add each member's
  perturbation to the shared dense result, ``y = x W^T + sigma (x B_i) A_i^T / sqrt(r)``.

Estimates ``g = sum_k c_k E_k`` are rebuilt from the seeds tensor by tensor and either written
into ``.grad`` (so any ``torch.optim`` optimizer takes the step) or applied in place as an
SGD step with no model-sized buffer (:func:`accumulate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import gemm
from .compiling import CompiledOrEager, gelus_through_aten
from .noise import SMALL, SeededNoise
from .rounding import ROUNDED_BITS, add_rounded_, round_key, stochastic_round_

Direction = tuple[int, float]  # (noise direction index, scale such as +sigma or -sigma)


STREAMED_BYTES = 1 << 24
"""Dense matrices of at least this many bytes (16 MB), owned by an ``nn.Linear`` or
``nn.Embedding``, are perturbed in the layer's output by :class:`InPlacePerturbation`, not in
place, so no copy of them is kept for the restore (a 49,152 x 576 tied embedding is 113 MB)."""
ROW_BLOCK_NUMEL = 1 << 20  # numbers of noise rows a streamed layer holds at once (4 MB)


class ParamSpace:
    """The tensors a forward-only optimizer searches over.

    Accepts a module, an iterable of parameters, or torch.optim-style param groups. Only tensors
    with ``requires_grad=True`` are included (a LoRA model trains its adapters only); tied
    parameters appear once.

    Example:
        >>> space = ParamSpace(nn.Linear(3, 2), rank=1)
        >>> space.names, space.lowrank
        (['weight', 'bias'], [True, False])
    """

    def __init__(self, params: nn.Module | Iterable[torch.Tensor] | Iterable[dict], rank: int = 0) -> None:
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.rank = int(rank)
        self.module = params if isinstance(params, nn.Module) else None
        named: list[tuple[str, torch.Tensor]] = []
        if isinstance(params, nn.Module):
            named = list(params.named_parameters())
        else:
            for j, item in enumerate(params):
                if isinstance(item, dict):
                    named += [(f"group{j}.{k}", p) for k, p in enumerate(item["params"])]
                else:
                    named.append((f"param{j}", item))
        self.tensors: list[torch.Tensor] = []
        self.names: list[str] = []
        self.index_of: dict[int, int] = {}
        for name, p in named:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"expected tensors to optimise, got {type(p).__name__} for {name}")
            if not p.requires_grad or id(p) in self.index_of:
                continue
            if not p.is_floating_point():
                raise TypeError(
                    f"parameter {name} has dtype {p.dtype}; only floating tensors can be perturbed"
                )
            self.index_of[id(p)] = len(self.tensors)
            self.tensors.append(p)
            self.names.append(name)
        if not self.tensors:
            raise ValueError("no parameters with requires_grad=True to optimise")
        self.lowrank = [self.rank > 0 and p.dim() >= 2 for p in self.tensors]

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.tensors)

    def matrix_shape(self, i: int) -> tuple[int, int]:
        p = self.tensors[i]
        return p.shape[0], p.numel() // p.shape[0]

    def factors(
        self, noise: SeededNoise, i: int, generation: int, direction: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank factors (A, B) of tensor ``i`` for one direction, in float32 on its device."""
        out_f, in_f = self.matrix_shape(i)
        return noise.lowrank(
            out_f,
            in_f,
            self.rank,
            generation=generation,
            member=direction,
            index=i,
            device=self.tensors[i].device,
        )

    def dense(self, noise: SeededNoise, i: int, generation: int, direction: int) -> torch.Tensor:
        """The perturbation direction ``E`` of tensor ``i`` materialised (float32, the tensor's shape)."""
        p = self.tensors[i]
        if self.lowrank[i]:
            a, b = self.factors(noise, i, generation, direction)
            return (a @ b.T).div_(math.sqrt(self.rank)).view(p.shape)
        return noise.full(p.shape, generation=generation, member=direction, index=i, device=p.device)

    def member_factors(
        self, noise: SeededNoise, i: int, generation: int, directions: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked low-rank factors of several directions: (k, out, r) and (k, in, r)."""
        out_f, in_f = self.matrix_shape(i)
        return noise.lowrank_members(
            out_f,
            in_f,
            self.rank,
            generation=generation,
            members=list(directions),
            index=i,
            device=self.tensors[i].device,
        )

    def member_dense(
        self, noise: SeededNoise, i: int, generation: int, directions: Sequence[int]
    ) -> torch.Tensor:
        """Stacked dense directions of several members: (k, *shape) float32."""
        p = self.tensors[i]
        if self.lowrank[i]:
            a, b = self.member_factors(noise, i, generation, directions)
            return torch.bmm(a, b.transpose(1, 2)).div_(math.sqrt(self.rank)).view(len(a), *p.shape)
        return noise.members(
            p.shape, generation=generation, members=list(directions), index=i, device=p.device
        )

    def streamable(self, i: int) -> bool:
        """Whether a layer may add tensor ``i``'s perturbation to its output instead of its weight:
        a dense matrix of at least :data:`STREAMED_BYTES` (copying it for the restore would cost
        more memory than the layer's activations)."""
        p = self.tensors[i]
        return not self.lowrank[i] and p.dim() == 2 and p.numel() * p.element_size() >= STREAMED_BYTES

    def direction_rows(
        self, noise: SeededNoise, i: int, generation: int, direction: int, alpha: float
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first row, alpha * E[rows])`` (float32) over a dense 2-D tensor's direction, a
        few blocks of noise at a time: the same numbers as :meth:`dense`, never all at once."""
        p = self.tensors[i]
        rows, cols = p.shape
        buf = torch.empty(max(1, ROW_BLOCK_NUMEL // cols) * cols, dtype=torch.float32, device=p.device)
        filled = row = 0
        for _, z in noise.full_chunks(
            p.numel(), generation=generation, member=direction, index=i, device=p.device
        ):
            pos = 0
            while pos < z.numel():
                take = min(z.numel() - pos, buf.numel() - filled)
                buf[filled : filled + take].copy_(z[pos : pos + take])
                filled, pos = filled + take, pos + take
                if filled == buf.numel():
                    yield row, buf.view(-1, cols).mul_(alpha)
                    row, filled = row + buf.numel() // cols, 0
        if filled:
            yield row, buf[:filled].view(-1, cols).mul_(alpha)

    def add_direction_(
        self, noise: SeededNoise, i: int, generation: int, direction: int, alpha: float, target: torch.Tensor
    ) -> None:
        """``target += alpha * E`` for tensor ``i``; dense noise is materialised a block at a time."""
        if self.lowrank[i]:
            a, b = self.factors(noise, i, generation, direction)
            flat = target.view(a.shape[0], b.shape[0])
            if flat.dtype == torch.float32:
                flat.addmm_(a, b.T, alpha=alpha / math.sqrt(self.rank))
            else:
                flat.add_(a @ b.T, alpha=alpha / math.sqrt(self.rank))
            return
        noise.add_(target, alpha, generation=generation, member=direction, index=i)


DENSE_MEMBER_ROWS = 8  # rows per member from which a dense-noise linear layer writes each member's weight
DENSE_MEMBER_NUMEL = 1 << 26  # ... as long as the members' weights of one layer stay under 256 MB
DENSE_STACK = 1 << 22  # numbers of stacked dense directions that accumulate holds at once (16 MB)


def accumulate(
    space: ParamSpace,
    noise: SeededNoise,
    generation: int,
    coefficients: Sequence[tuple[int, float]],
    *,
    lr: float | None = None,
    into: str = "grad",
) -> None:
    """Rebuild ``g = sum_k c_k E_k`` from the seeds and use it, one tensor at a time.

    ``into="grad"`` writes ``g`` into each parameter's ``.grad`` (overwriting it) so that any
    torch optimizer can step. ``into="update"`` applies ``p -= lr * g`` in place; the dense noise
    of a tensor larger than ``DENSE_STACK`` numbers is then added block by block, so no buffer of
    its size, let alone the model's, is made. A bfloat16 / float16 weight gets its update summed in
    float32 and rounded stochastically (:mod:`nograd.core.rounding`), once per step: rounded to
    nearest, an update far below the weight's spacing would be lost.
    """
    if into not in ("grad", "update"):
        raise ValueError(f"into must be 'grad' or 'update', got {into!r}")
    if into == "update" and lr is None:
        raise ValueError("accumulate(into='update') needs lr")

    def use(p: torch.Tensor, g: torch.Tensor, i: int) -> None:
        if into == "grad":
            p.grad = g.to(p.dtype)
        else:  # summed in float32 so a low-precision weight is rounded once per step
            add_rounded_(p.data, g, round_key(noise.seed, generation, i), alpha=-lr)

    with torch.no_grad():
        for i, p in enumerate(space.tensors):
            if space.lowrank[i] and len(coefficients) > 1:
                # sum_k c_k A_k B_k^T as one matrix product over the stacked factors
                a, b = space.member_factors(noise, i, generation, [d for d, _ in coefficients])
                c = torch.tensor([c for _, c in coefficients], dtype=a.dtype, device=a.device)
                a = (a * c.view(-1, 1, 1)).transpose(0, 1).flatten(1)  # (out, k*r)
                use(p, (a @ b.transpose(0, 1).flatten(1).T).div_(math.sqrt(space.rank)).view(p.shape), i)
            elif (
                not space.lowrank[i]
                and SMALL < p.numel() <= DENSE_STACK
                and len(coefficients) > 1
                and noise.reads_in_place(i)
            ):
                # the shared table's slices, summed where they lie: no stack of directions
                g = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                dirs, cs = [d for d, _ in coefficients], [c for _, c in coefficients]
                noise.accumulate_(g, cs, generation=generation, members=dirs, index=i)
                use(p, g.view(p.shape), i)
            elif not space.lowrank[i] and p.numel() <= DENSE_STACK and len(coefficients) > 1:
                # dense tensors up to DENSE_STACK numbers: directions stacked a chunk at a time, one
                # matrix-vector product per chunk instead of an add per direction
                k = max(1, DENSE_STACK // p.numel())
                g = None
                for start in range(0, len(coefficients), k):
                    part = coefficients[start : start + k]
                    e = space.member_dense(noise, i, generation, [d for d, _ in part])
                    c = torch.tensor([c for _, c in part], dtype=e.dtype, device=e.device)
                    term = torch.tensordot(c, e, dims=1)
                    g = term if g is None else g.add_(term)
                use(p, g, i)
            elif into == "update" and p.dtype == torch.float32:
                # straight into the weights, block by block: no tensor-sized buffer
                for d, c in coefficients:
                    space.add_direction_(noise, i, generation, d, -lr * c, p.data)
            elif (
                into == "update"
                and p.dtype in ROUNDED_BITS
                and not space.lowrank[i]
                and len(coefficients) == 1
            ):
                _update_rounded_in_chunks(space, noise, i, generation, coefficients[0], lr)
            else:
                g = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                for d, c in coefficients:
                    space.add_direction_(noise, i, generation, d, c, g)
                use(p, g, i)


def _update_rounded_in_chunks(
    space: ParamSpace, noise: SeededNoise, i: int, generation: int, coefficient: tuple[int, float], lr: float
) -> None:
    """``p -= lr * c E`` for a dense low-precision tensor and one direction (MeZO's step), a chunk
    of noise at a time: each chunk summed in float32 and rounded stochastically, no tensor-sized
    buffer. The chunks come from ``noise.full_chunks``, so shaped noise is shaped here too."""
    flat = space.tensors[i].data.view(-1)
    key = round_key(noise.seed, generation, i)
    direction, c = coefficient
    for start, z in noise.full_chunks(
        flat.numel(), generation=generation, member=direction, index=i, device=flat.device
    ):
        part = flat[start : start + z.numel()]
        stochastic_round_(part, part.to(torch.float32).add_(z, alpha=-lr * c), key, start=start)


def _unique_directions(members: Sequence[Direction]) -> tuple[list[int], torch.Tensor | None]:
    """Distinct directions in first-seen order, and each member's row among them (None if all distinct)."""
    dirs = [d for d, _ in members]
    first: dict[int, int] = {}
    for d in dirs:
        first.setdefault(d, len(first))
    if len(first) == len(dirs):
        return dirs, None
    return list(first), torch.tensor([first[d] for d in dirs], dtype=torch.long)


def _mirrored_pair_scale(members: Sequence[Direction]) -> float | None:
    """``s`` when members are ``(d_0, s), (d_0, -s), (d_1, s), (d_1, -s), ...`` with distinct
    ``d_k`` (the antithetic population), else None."""
    if len(members) < 2 or len(members) % 2:
        return None
    s = members[0][1]
    plus, minus = members[::2], members[1::2]
    dirs = [d for d, _ in plus]
    if len(set(dirs)) != len(dirs) or any(
        dp != dm or sp != s or sm != -s for (dp, sp), (dm, sm) in zip(plus, minus)
    ):
        return None
    return float(s)


def _direct_owners(space: ParamSpace, module: nn.Module) -> dict[int, list[int]]:
    """id(module) -> indices of the space's tensors registered directly on it."""
    owners: dict[int, list[int]] = {}
    for m in module.modules():
        idx = [
            space.index_of[id(p)] for p in m._parameters.values() if p is not None and id(p) in space.index_of
        ]
        if idx:
            owners[id(m)] = idx
    return owners


class InPlacePerturbation:
    """Evaluate ``f(theta + scale * E_d)`` at inference memory with a bit-exact restore.

    While the context of :meth:`apply` is open, global module hooks perturb a module's own
    parameters when its forward starts (saving a copy of just those tensors) and copy them back
    when it ends. A large dense weight of an ``nn.Linear`` or ``nn.Embedding`` (at least
    :data:`STREAMED_BYTES`) is not touched at all: the layer's output gets the perturbation's
    contribution instead, from a few rows of noise at a time, so no copy of it is kept.
    Tied parameters are perturbed once by whichever owner runs first. Tensors that
    no module forward touches (raw tensors passed to a function) are perturbed for the whole
    context instead, which costs a copy of those tensors. Ownership is found from ``module`` if
    given, else by a first, unperturbed forward of the closure (:meth:`discover`).
    """

    def __init__(self, space: ParamSpace, noise: SeededNoise, module: nn.Module | None = None) -> None:
        self.space = space
        self.noise = noise
        self.module = module if module is not None else space.module
        self.owners: dict[int, list[int]] | None = None
        self.stream_of: dict[int, list[int]] = {}  # module id -> tensors it perturbs in its output
        self.unowned: list[int] = []
        if self.module is not None:
            self._set_owners(_direct_owners(space, self.module))

    def _set_owners(self, owners: dict[int, list[int]]) -> None:
        self.owners = owners
        self.stream_of = {}
        owned = {i for idx in owners.values() for i in idx}
        self.unowned = [i for i in range(len(self.space)) if i not in owned]

    @property
    def needs_discovery(self) -> bool:
        return self.owners is None

    def discover(self, closure: Callable[[], object]) -> object:
        """Run ``closure`` unperturbed, recording which modules' forwards own which tensors."""
        owners: dict[int, list[int]] = {}

        def pre(module: nn.Module, args: tuple) -> None:
            if id(module) in owners:
                return
            idx = [
                self.space.index_of[id(p)]
                for p in module._parameters.values()
                if p is not None and id(p) in self.space.index_of
            ]
            if idx:
                owners[id(module)] = idx

        handle = nn.modules.module.register_module_forward_pre_hook(pre)
        try:
            with torch.no_grad():
                value = closure()
        finally:
            handle.remove()
        self._set_owners(owners)
        return value

    def _streamed(self, module: nn.Module, indices: list[int]) -> list[int]:
        """The tensors among ``indices`` that ``module`` perturbs in its output (see STREAMED_BYTES)."""
        streamable = getattr(self.space, "streamable", None)
        if streamable is None or not isinstance(module, (nn.Linear, nn.Embedding)):
            return []
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            return []
        weight = self.space.index_of.get(id(module.weight))
        return [i for i in indices if i == weight and streamable(i)]

    @contextmanager
    def apply(self, generation: int, direction: int, scale: float) -> Iterator[None]:
        if self.owners is None:
            raise RuntimeError("call discover(closure) first or construct with a module")
        space, saved, depth = self.space, {}, {}
        owners, stream_of = self.owners, self.stream_of

        def perturb(indices: Iterable[int]) -> None:
            for i in indices:
                depth[i] = depth.get(i, 0) + 1
                if depth[i] == 1:
                    p = space.tensors[i]
                    saved[i] = p.detach().clone()
                    space.add_direction_(self.noise, i, generation, direction, scale, p.data)

        def restore(indices: Iterable[int]) -> None:
            for i in indices:
                depth[i] -= 1
                if depth[i] == 0:
                    space.tensors[i].data.copy_(saved.pop(i))

        def streamed(module: nn.Module, idx: list[int]) -> list[int]:
            if id(module) not in stream_of:
                stream_of[id(module)] = self._streamed(module, idx)
            # a tensor already perturbed in place by an enclosing owner is not perturbed twice
            return [i for i in stream_of[id(module)] if not depth.get(i)]

        active: dict[int, list[int]] = {}  # module id -> (streamed tensors) while its forward runs

        def pre(module: nn.Module, args: tuple) -> None:
            idx = owners.get(id(module))
            if idx is None:
                return
            active[id(module)] = streamed(module, idx)
            perturb([i for i in idx if i not in active[id(module)]])

        def post(module: nn.Module, args: tuple, output: object) -> object:
            idx = owners.get(id(module))
            if idx is None:
                return None
            stream = active.pop(id(module), [])
            restore([i for i in idx if i not in stream])
            if stream and isinstance(output, torch.Tensor) and args:
                return self._add_streamed(module, args[0], output, stream[0], generation, direction, scale)
            return None

        h1 = nn.modules.module.register_module_forward_pre_hook(pre)
        h2 = nn.modules.module.register_module_forward_hook(post, always_call=True)
        try:
            with torch.no_grad():
                perturb(self.unowned)
            yield
        finally:
            h1.remove()
            h2.remove()
            with torch.no_grad():
                restore(self.unowned)
                for i in list(saved):  # a forward that raised mid-way
                    space.tensors[i].data.copy_(saved.pop(i))

    def _add_streamed(
        self,
        module: nn.Module,
        x: torch.Tensor,
        out: torch.Tensor,
        i: int,
        generation: int,
        direction: int,
        scale: float,
    ) -> torch.Tensor:
        """The layer's output at ``W + scale E`` from its output at ``W``, E a few rows at a time:
        ``out[..., rows] += scale x E[rows]^T`` (Linear), ``out[n] += scale E[ids[n]]`` (Embedding)."""
        out = out if out.is_contiguous() else out.contiguous()
        with torch.no_grad():
            rows = self.space.direction_rows(self.noise, i, generation, direction, scale)
            if isinstance(module, nn.Linear):
                # a small input (an LM head on the answer position) goes up to float32: a bfloat16
                # matmul against each block of rows took a 35 MB scratch buffer on this CPU
                small = x.numel() <= ROW_BLOCK_NUMEL
                xs = x.float() if small else x
                for r0, block in rows:
                    out[..., r0 : r0 + block.shape[0]].add_(
                        F.linear(xs, block if small else block.to(x.dtype))
                    )
                return out
            ids = x.reshape(-1)
            flat = out.view(-1, out.shape[-1])
            for r0, block in rows:
                hit = ((ids >= r0) & (ids < r0 + block.shape[0])).nonzero().squeeze(1)
                if len(hit):
                    flat.index_add_(0, hit, block.index_select(0, ids[hit] - r0).to(flat.dtype))
        return out


class _Live:
    """What the layers of a :class:`BatchedPerturbation` read while its context is open."""

    def __init__(self, generation: int, members: list[Direction]) -> None:
        self.generation = generation
        self.members = members
        self.count = len(members)
        self.cache: dict[tuple[str, int], Any] = {}
        self.selected: int | None = None  # set while a fallback layer runs one member at a time
        self.pair_scale = _mirrored_pair_scale(members)
        # the same for every tensor of the generation: worked out once, not per layer
        self.unique, self.where = _unique_directions(members)
        self.unit_scales = all(s == 1.0 for _, s in members)
        self.scales = torch.tensor([s for _, s in members], dtype=torch.float32)
        self._on: dict[torch.device, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def where_and_scales(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Each member's row among the unique directions, and the members' scales, on ``device``."""
        if device not in self._on:
            where = None if self.where is None else self.where.to(device)
            self._on[device] = (where, self.scales.to(device))
        return self._on[device]


def _member_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids[i]`` of member ``i``'s table: ``(P, V, d)`` and ``(P, T)`` -> ``(P, T, d)``."""
    return torch.gather(table, 1, ids.unsqueeze(-1).expand(-1, -1, table.shape[-1]))


class BatchedPerturbation:
    """Evaluate many perturbed copies of ``module`` in one forward pass (EGGROLL).

    Inside :meth:`apply` the module's input must be member-major: rows ``[m*b, (m+1)*b)`` belong
    to member ``m``. ``nn.Linear`` and ``nn.Embedding`` add the low-rank term to the shared dense
    product; norm layers and biases add their small dense perturbations; any other layer with its
    own trainable parameters is run once per member through ``torch.func.functional_call`` with
    its perturbed weights (correct, slower). With ``space.rank == 0`` matrices get dense
    per-member noise (the naive full-rank population, for comparison).

    ``compile=True`` runs the module's forward through ``torch.compile`` (inductor: C++/OpenMP
    kernels on CPU, Triton on GPU), so each layer's dense product, low-rank term, bias,
    per-member norm affine and the activation after it fuse into fewer passes over the layer's
    output. The noise of a generation is drawn before the forward, outside the compiled graph,
    into tensors the graph takes as inputs, and the layers' forwards are the same function
    objects every generation, so the graph is compiled once (the first generation pays for it:
    :attr:`compile_seconds`) and not again unless the population size changes. If compilation
    fails (no C++ compiler, an unsupported layer), one warning is printed and the eager path runs.

    ``replace=True`` (dense only): the per-member tensors ``noise.members(...)`` are the members'
    own values of the tensors, not perturbations of the module's, as a flat strategy's candidates
    are. A linear layer then runs one ``baddbmm`` over the members' weights (inference of ``P``
    distinct copies) instead of the shared product plus a per-member one, which for dense members
    would double the work; embeddings gather from the members' tables and norms apply the
    members' affines.
    """

    def __init__(
        self,
        module: nn.Module,
        space: ParamSpace,
        noise: SeededNoise,
        compile: bool = False,
        replace: bool = False,
    ) -> None:
        if space.module is not None and space.module is not module:
            raise ValueError("the ParamSpace was built from another module")
        if replace and (space.rank or compile):
            raise ValueError("replace=True takes dense per-member values (rank 0), eagerly")
        self.replace = bool(replace)
        self.module = module
        self.space = space
        self.noise = noise
        self.owners = _direct_owners(space, module)
        self.fallback: list[nn.Module] = []
        for m in module.modules():
            if id(m) not in self.owners:
                continue
            supported = isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm)) or (
                hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm)
            )
            if isinstance(m, nn.Embedding) and (m.max_norm is not None):
                supported = False
            if not supported:
                self.fallback.append(m)
        self._compile = bool(compile)
        gemm.backend()  # chosen now, not inside a compiled trace
        self._live: _Live | None = None
        self._forwards: dict[int, Callable] = {}  # module id -> its population forward (compiled mode)
        self._compiled: CompiledOrEager | None = None

    # per-member noise -----------------------------------------------------------------------
    def _member_factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (A * scale / sqrt(r), B) over members: (P, out, r), (P, in, r)."""
        live = self._live
        a, b = self.space.member_factors(self.noise, i, live.generation, live.unique)
        where, scale = live.where_and_scales(a.device)
        if where is not None:  # antithetic pairs share a direction: draw it once
            a, b = a.index_select(0, where), b.index_select(0, where)
        return a * (scale / math.sqrt(self.space.rank)).view(-1, 1, 1), b

    def _member_dense(self, i: int) -> torch.Tensor:
        """Stacked scale * E over members: (P, *shape)."""
        live = self._live
        e = self.space.member_dense(self.noise, i, live.generation, live.unique)
        where, scale = live.where_and_scales(e.device)
        if where is not None:
            e = e.index_select(0, where)
        if live.unit_scales:  # rows given as they are (the flat strategies' candidates)
            return e
        return e.mul_(scale.view(-1, *([1] * (e.dim() - 1))))

    # what the layers read (computed on first use; all up front when compiled) -------------------
    def _pick(self, stack: torch.Tensor) -> torch.Tensor:
        m = self._live.selected
        return stack if m is None else stack[m : m + 1]

    def _factors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        live = self._live
        if ("f", i) not in live.cache:
            live.cache[("f", i)] = self._member_factors(i)
        a, b = live.cache[("f", i)]
        return self._pick(a), self._pick(b)

    def _dense(self, i: int) -> torch.Tensor:
        live = self._live
        if ("d", i) not in live.cache:
            live.cache[("d", i)] = self._member_dense(i)
        return self._pick(live.cache[("d", i)])

    def _pair_dense(self, i: int) -> torch.Tensor:
        """The unscaled direction of each mirrored pair: (P / 2, *shape)."""
        live = self._live
        if ("p", i) not in live.cache:
            uniq = [d for d, _ in live.members[::2]]
            live.cache[("p", i)] = self.space.member_dense(self.noise, i, live.generation, uniq)
        return live.cache[("p", i)]

    def _grouped(self, t: torch.Tensor) -> torch.Tensor:
        k = self._live.count if self._live.selected is None else 1
        if t.shape[0] % k:
            raise ValueError(
                f"batched population: the batch has {t.shape[0]} rows, not a multiple of {k} members"
            )
        return t.reshape(k, -1, *t.shape[1:])

    def _prefill(self) -> None:
        """Draw every tensor's noise for this generation before the (compiled) forward: what each
        layer will read, and nothing more (a dense Linear weight of mirrored pairs: one per pair)."""
        space, live = self.space, self._live
        for m in self.module.modules():
            for p in m._parameters.values():
                i = space.index_of.get(id(p)) if p is not None else None
                if i is None or id(m) not in self.owners:
                    continue
                if space.lowrank[i]:
                    self._factors(i)
                elif isinstance(m, nn.Linear) and p is m.weight and live.pair_scale is not None:
                    self._pair_dense(i)
                else:
                    self._dense(i)

    # the layers ----------------------------------------------------------------------------------
    def _linear(self, mod: nn.Linear, x_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        space, idx_of = self.space, self.space.index_of
        out = out if out.is_contiguous() else out.contiguous()
        o = self._grouped(out).flatten(1, -2)  # a view: the in-place adds below update ``out``
        x = self._grouped(x_in).flatten(1, -2)
        wi = idx_of.get(id(mod.weight))
        bi = idx_of.get(id(mod.bias)) if mod.bias is not None else None
        db = self._dense(bi).unsqueeze(1).to(o.dtype) if bi is not None else None
        if wi is not None and space.lowrank[wi]:
            a, b = self._factors(wi)
            # (xB)^T = B^T x^T: on CPU this batched matrix-vector form is about twice as fast,
            # given B^T with standard strides (.contiguous() keeps odd ones when r == 1)
            bt = b.transpose(1, 2).to(x.dtype).clone(memory_format=torch.contiguous_format)
            bx = torch.bmm(bt, x.transpose(1, 2))  # (P, r, rows)
            at = a.transpose(1, 2).to(x.dtype)
            if db is not None:  # the bias rides along as one more rank: [xB, 1] [A^T; db]
                bx = torch.cat([bx, bx.new_ones(bx.shape[0], 1, bx.shape[2])], dim=1)
                at, db = torch.cat([at, db], dim=1), None
            o.baddbmm_(bx.transpose(1, 2), at)
        elif wi is not None and self._live.pair_scale is not None and self._live.selected is None:
            # mirrored pairs share a direction: members 2k and 2k+1 add +-s x E_k^T, so each
            # direction is drawn and read once, not copied per member
            et = self._pair_dense(wi).transpose(1, 2).to(x.dtype)
            sign = x.new_tensor([1.0, -1.0]).view(1, 2, 1, 1)
            xs = (x.unflatten(0, (-1, 2)) * sign).flatten(1, 2)  # (P / 2, 2 rows, in)
            o.view(xs.shape[0], -1, o.shape[-1]).baddbmm_(xs, et, alpha=self._live.pair_scale)
        elif wi is not None:
            o.baddbmm_(x, self._dense(wi).transpose(1, 2).to(x.dtype))
        if db is not None:
            o.add_(db)
        return out

    def _dense_linear(self, mod: nn.Linear, x_in: torch.Tensor) -> torch.Tensor:
        """A linear layer whose weight gets dense per-member noise: with several rows per member,
        each member's weight ``W + s_m E_m`` is written once and the rows go through one
        ``baddbmm`` (the shared product plus a per-member one would compute every row twice);
        with few rows, or weights too large to write per member, the shared product and the
        per-member term of :meth:`_linear`."""
        members = self._live.count if self._live.selected is None else 1
        rows = x_in.numel() // max(1, x_in.shape[-1] * members)
        if rows >= DENSE_MEMBER_ROWS and members * mod.weight.numel() <= DENSE_MEMBER_NUMEL:
            return self._linear_members(mod, x_in)
        return self._linear(mod, x_in, F.linear(x_in, mod.weight, mod.bias))

    def _member_weights(self, mod: nn.Linear, wi: int | None, count: int) -> torch.Tensor:
        """Each member's weight, ``(count, out, in)``: its own values with ``replace=True``, else the
        module's plus the member's noise (mirrored pairs: ``W + s E_k`` and ``W - s E_k`` from one
        draw of ``E_k``)."""
        if wi is None:
            return mod.weight.unsqueeze(0).expand(count, -1, -1)
        if self.replace:
            return self._dense(wi)
        live = self._live
        base = mod.weight.to(torch.float32)
        if live.pair_scale is not None and live.selected is None and self._table_in_place(wi):
            return self._pair_weights_from_table(base, wi)
        if live.pair_scale is not None and live.selected is None:
            e = self._pair_dense(wi)
            w = torch.empty(e.shape[0], 2, *e.shape[1:], dtype=e.dtype, device=e.device)
            torch.add(base, e, alpha=live.pair_scale, out=w[:, 0])
            torch.add(base, e, alpha=-live.pair_scale, out=w[:, 1])
            return w.flatten(0, 1)
        return self._dense(wi) + base

    def _table_in_place(self, i: int) -> bool:
        """Whether tensor ``i``'s members read the shared noise table's slices where they lie."""
        n = self.space.tensors[i].numel()
        return isinstance(self.noise, SeededNoise) and n > SMALL and self.noise.reads_in_place(i)

    def _pair_weights_from_table(self, base: torch.Tensor, wi: int) -> torch.Tensor:
        """``W + s E_k`` and ``W - s E_k`` for each mirrored pair, ``(P, out, in)``, written straight
        from the table's slices of ``E_k`` (no stack of directions drawn first)."""
        live, s = self._live, self._live.pair_scale
        pairs = [d for d, _ in live.members[::2]]
        w = torch.empty(len(pairs), 2, base.numel(), dtype=base.dtype, device=base.device)
        flat = base.view(-1)
        for k, d in enumerate(pairs):
            for start, z in self.noise.member_blocks(base.numel(), live.generation, d, wi, base.device):
                end = start + z.numel()
                torch.add(flat[start:end], z, alpha=s, out=w[k, 0, start:end])
                torch.add(flat[start:end], z, alpha=-s, out=w[k, 1, start:end])
        return w.view(2 * len(pairs), *base.shape)

    def _linear_members(self, mod: nn.Linear, x_in: torch.Tensor) -> torch.Tensor:
        """Each member's rows through its own weight and bias, one ``baddbmm``."""
        idx_of = self.space.index_of
        x = self._grouped(x_in).flatten(1, -2)
        wi = idx_of.get(id(mod.weight))
        bi = idx_of.get(id(mod.bias)) if mod.bias is not None else None
        w = self._member_weights(mod, wi, x.shape[0]).to(x.dtype).transpose(1, 2)
        if bi is not None:
            bias = self._dense(bi) if self.replace else self._dense(bi) + mod.bias
            out = torch.baddbmm(bias.unsqueeze(1).to(x.dtype), x, w)
        elif mod.bias is not None:
            out = torch.baddbmm(mod.bias.to(x.dtype), x, w)
        else:
            out = torch.bmm(x, w)
        return out.reshape(*x_in.shape[:-1], out.shape[-1])

    def _linear_traced(self, mod: nn.Linear, x_in: torch.Tensor) -> torch.Tensor:
        """:meth:`_linear` without in-place updates, for the compiler: ``x W^T + b`` plus each
        member's ``(x B_i) A_i^T`` (and bias noise) as plain expressions it can fuse with what follows."""
        space, live, idx_of = self.space, self._live, self.space.index_of
        # no bias in the matmul: addmm would first copy the bias into every output row (a full
        # pass over the output); added below, it joins the kernel that adds the low-rank term
        out = gemm.linear(x_in, mod.weight)
        x = self._grouped(x_in).flatten(1, -2)
        shape = (x.shape[0], x.shape[1], out.shape[-1])
        wi = idx_of.get(id(mod.weight))
        bi = idx_of.get(id(mod.bias)) if mod.bias is not None else None
        terms = [] if mod.bias is None else [mod.bias.to(x.dtype)]
        if wi is not None and space.lowrank[wi]:
            a, b = self._factors(wi)
            xb = torch.bmm(x, b.to(x.dtype))  # (P, rows, r)
            # a sum of r broadcast products, not a bmm: a pointwise expression, which the
            # compiler fuses with the add to x W^T and with the activation that follows
            at = a.transpose(1, 2).to(x.dtype)  # (P, r, out)
            terms += [xb[..., k : k + 1] * at[:, k : k + 1] for k in range(xb.shape[-1])]
        elif wi is not None and live.pair_scale is not None:
            et = self._pair_dense(wi).transpose(1, 2).to(x.dtype)
            sign = x.new_tensor([1.0, -1.0]).view(1, 2, 1, 1)
            xs = (x.unflatten(0, (-1, 2)) * sign).flatten(1, 2)
            terms.append((torch.bmm(xs, et) * live.pair_scale).view(shape))
        elif wi is not None:
            terms.append(torch.bmm(x, self._dense(wi).transpose(1, 2).to(x.dtype)))
        if bi is not None:
            terms.append(self._dense(bi).unsqueeze(1).to(x.dtype))
        if not terms:
            return out
        out = out.reshape(shape)
        for t in terms:
            out = out + t
        return out.reshape(*x_in.shape[:-1], out.shape[-1])

    def _dense_weight(self, mod: nn.Linear) -> bool:
        """Whether the layer's weight is searched with dense (not low-rank) noise."""
        wi = self.space.index_of.get(id(mod.weight))
        return wi is not None and not self.space.lowrank[wi]

    def _embedding_members(self, mod: nn.Embedding, ids_in: torch.Tensor) -> torch.Tensor:
        """``replace=True``: each member's rows looked up in its own table."""
        table = self._dense(self.space.index_of[id(mod.weight)])
        ids = self._grouped(ids_in).flatten(1)
        rows = _member_rows(table, ids)
        return rows.reshape(*ids_in.shape, table.shape[-1]).to(mod.weight.dtype)

    def _embedding(self, mod: nn.Embedding, ids_in: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        wi = self.space.index_of.get(id(mod.weight))
        ids = self._grouped(ids_in).flatten(1)
        out = out if out.is_contiguous() else out.contiguous()
        o = self._grouped(out).flatten(1, -2)
        if self.space.lowrank[wi]:
            a, b = self._factors(wi)
            rows = _member_rows(a, ids)
            o.baddbmm_(rows.to(o.dtype), b.transpose(1, 2).to(o.dtype))
        else:
            d = self._dense(wi)
            o.add_(_member_rows(d, ids).to(o.dtype))
        return out

    def _embedding_traced(self, mod: nn.Embedding, ids_in: torch.Tensor) -> torch.Tensor:
        """:meth:`_embedding` without in-place updates, for the compiler: each member's low-rank
        rows ``A_i[ids] B_i^T`` as a sum of ``r`` broadcast products, which it fuses with what
        follows (a ``baddbmm`` would be a kernel of its own, writing and reading the rows again)."""
        out = mod.__class__.forward(mod, ids_in)
        wi = self.space.index_of.get(id(mod.weight))
        ids = self._grouped(ids_in).flatten(1)
        o = self._grouped(out).flatten(1, -2)
        if self.space.lowrank[wi]:
            a, b = self._factors(wi)
            rows = _member_rows(a, ids).to(o.dtype)
            bt = b.transpose(1, 2).to(o.dtype)  # (P, r, dim)
            for k in range(rows.shape[-1]):
                o = o + rows[..., k : k + 1] * bt[:, k : k + 1]
        else:
            d = self._dense(wi)
            o = o + _member_rows(d, ids).to(o.dtype)
        return o.reshape(out.shape)

    def _norm(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Normalise once, then apply each member's perturbed affine in one fused pass."""
        shape = tuple(mod.normalized_shape)
        idx_of = self.space.index_of
        weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
        wi = idx_of.get(id(weight)) if weight is not None else None
        bi = idx_of.get(id(bias)) if bias is not None else None
        if isinstance(mod, nn.LayerNorm):
            g = self._grouped(F.layer_norm(x, shape, None, None, mod.eps))
        else:
            g = self._grouped(F.rms_norm(x, shape, None, mod.eps))
        member_shape = (g.shape[0], *([1] * (g.dim() - 1 - len(shape))), *shape)

        def affine(base: torch.Tensor | None, i: int | None) -> torch.Tensor | None:
            if base is None or i is None:
                return None if base is None else base.to(g.dtype)
            own = self._dense(i).to(g.dtype).view(member_shape)
            return own if self.replace else base.to(g.dtype) + own

        w, b = affine(weight, wi), affine(bias, bi)
        if w is None:
            out = g if b is None else g + b
        else:
            out = g * w if b is None else torch.addcmul(b, g, w)
        return out.reshape(x.shape)

    def _per_member(self, mod: nn.Module, forward: Callable) -> Callable:
        """An unsupported layer runs once per member with its own parameters perturbed."""
        idx_of = self.space.index_of
        own = [(name, p) for name, p in mod._parameters.items() if p is not None and id(p) in idx_of]

        def wrapper(x: torch.Tensor, *args, **kwargs):
            live = self._live
            if live.selected is not None:  # already inside another layer's per-member loop
                return call(member_params(), x, args, kwargs)
            outs = []
            for m, chunk in enumerate(self._grouped(x)):
                live.selected = m
                try:
                    params = member_params()
                    outs.append(call(params, chunk, args, kwargs))
                finally:
                    live.selected = None
            return torch.cat(outs)

        def member_params() -> dict[str, torch.Tensor]:
            values = {name: self._dense(idx_of[id(p)])[0].to(p.dtype) for name, p in own}
            return values if self.replace else {name: p + values[name] for name, p in own}

        def call(params: dict, x: torch.Tensor, args: tuple, kwargs: dict):
            # functional_call goes through mod.forward: point it at the original meanwhile
            mod.forward = forward
            try:
                return torch.func.functional_call(mod, params, (x, *args), kwargs, strict=False)
            finally:
                mod.forward = wrapper

        return wrapper

    def _population_forward(self, m: nn.Module) -> Callable:
        """``m``'s forward as a population layer, one function object per module (compiled mode)."""
        if id(m) not in self._forwards:
            if isinstance(m, nn.Linear):
                fwd = lambda x: self._linear_traced(m, x)  # noqa: E731
            elif isinstance(m, nn.Embedding):
                fwd = lambda ids: self._embedding_traced(m, ids)  # noqa: E731
            else:
                fwd = lambda x: self._norm(m, x)  # noqa: E731
            self._forwards[id(m)] = fwd
        return self._forwards[id(m)]

    # the context ---------------------------------------------------------------------------------
    @contextmanager
    def apply(self, generation: int, members: Sequence[Direction]) -> Iterator[None]:
        """Open a context in which ``module(x)`` with ``len(members)`` member-major groups of rows
        evaluates member ``m`` at ``theta + scale_m * E_{direction_m}``."""
        members = list(members)
        if not members:
            raise ValueError("no members to evaluate")
        if self._live is not None:
            raise RuntimeError("this BatchedPerturbation's context is already open")
        self._live = _Live(generation, members)
        compiled = self.compile and not self.fallback
        handles, patched = [], []
        fallback_ids = {id(m) for m in self.fallback}
        for m in self.module.modules():
            if id(m) not in self.owners:
                continue
            if id(m) in fallback_ids:
                patched.append((m, m.forward))
                m.forward = self._per_member(m, m.forward)
            elif compiled:
                patched.append((m, m.forward))
                m.forward = self._population_forward(m)
            elif self.replace and isinstance(m, (nn.Linear, nn.Embedding)):
                patched.append((m, m.forward))
                if isinstance(m, nn.Linear):
                    m.forward = lambda x, m=m: self._linear_members(m, x)
                else:
                    m.forward = lambda ids, m=m: self._embedding_members(m, ids)
            elif isinstance(m, nn.Linear) and self._dense_weight(m):
                patched.append((m, m.forward))
                m.forward = lambda x, m=m: self._dense_linear(m, x)
            elif isinstance(m, nn.Linear):  # the shared product through this machine's faster GEMM
                patched.append((m, m.forward))
                m.forward = lambda x, m=m: self._linear(m, x, gemm.linear(x, m.weight, m.bias))
            elif isinstance(m, nn.Embedding):
                handles.append(
                    m.register_forward_hook(lambda mod, args, out: self._embedding(mod, args[0], out))
                )
            else:
                patched.append((m, m.forward))
                m.forward = lambda x, m=m: self._norm(m, x)
        try:
            with torch.no_grad(), ExitStack() as kernels:
                if compiled:
                    self._prefill()
                    kernels.enter_context(gelus_through_aten(self.module, self._forwards))
                    patched.append((self.module, self.module.forward))
                    self.module.forward = self._compiled_forward(self.module.forward)
                yield
        finally:
            self._live = None
            for h in handles:
                h.remove()
            for m, fwd in reversed(patched):
                if fwd == type(m).forward.__get__(m):  # it was the class's: drop the shadow
                    m.__dict__.pop("forward", None)
                else:
                    m.forward = fwd

    def _compiled_forward(self, original: Callable) -> CompiledOrEager:
        """The module's forward through torch.compile, built once; eager (one warning) if that fails."""
        if self._compiled is None:
            self._compiled = CompiledOrEager(original)
        return self._compiled

    @property
    def compile_seconds(self) -> float | None:
        """The first compiled forward's time (compiling included), once it has run."""
        return None if self._compiled is None else self._compiled.first_call_seconds

    @property
    def compile(self) -> bool:
        """Whether the forward runs compiled: asked for, and not failed."""
        return self._compile and not (self._compiled is not None and self._compiled.failed)


def member_directions(members: Iterable[int], sigma: float, antithetic: bool = True) -> list[Direction]:
    """Member ids -> (direction, scale). Antithetic: 2k -> (k, +sigma), 2k+1 -> (k, -sigma)."""
    if antithetic:
        return [(m // 2, sigma if m % 2 == 0 else -sigma) for m in members]
    return [(m, sigma) for m in members]


def evaluate_population(
    batched: BatchedPerturbation,
    generation: int,
    population: int,
    sigma: float,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    *,
    antithetic: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Losses of ``population`` members on the same ``inputs`` (common random numbers).

    ``loss_fn(rows)`` maps a member-major batch of ``k * b`` rows to per-row losses ``(k*b,)``;
    a member's loss is the mean over its rows. ``chunk_size`` members are evaluated per forward;
    the result does not depend on it, because each member's noise depends only on its seed.
    """
    if population < 1 or (antithetic and population % 2):
        raise ValueError(
            f"population must be a positive{' even' if antithetic else ''} number, got {population}"
        )
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    chunk = population if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b = inputs.shape[0]
    out = []
    for start in range(0, population, chunk):
        ids = range(start, min(population, start + chunk))
        dirs = member_directions(ids, sigma, antithetic)
        rows = inputs.repeat(len(dirs), *([1] * (inputs.dim() - 1)))
        with batched.apply(generation, dirs):
            per_row = loss_fn(rows)
        out.append(per_row.detach().float().view(len(dirs), b).mean(1))
    return torch.cat(out)
