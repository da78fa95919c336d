"""Seeded noise that is regenerated, never stored.

Every random number a forward-only optimizer draws is a pure function of
``(seed, generation, member, index, block)``:

* ``seed``        the run's seed,
* ``generation``  the optimizer step,
* ``member``      the direction within the step (antithetic pairs share one),
* ``index``       which tensor (parameter) of the search space,
* ``block``       which fixed-size block of that tensor (``BLOCK`` elements).

Small tensors (low-rank factors, biases, norm gains: at most ``SMALL`` elements) are drawn for
``GROUP`` consecutive members at once, member ``m`` being row ``m % GROUP`` of the draw keyed by
group ``m // GROUP``: a population then costs a few generator calls instead of one per member.

A 64-bit key is derived from these with a splitmix64 hash and seeds a fresh
``torch.Generator``. Because a block's numbers depend on nothing else, the
same noise comes out whatever the chunk size, the order in which members are
visited, or how many processes share the work: distributed ES can exchange
seeds and fitness values only. Numbers are reproducible per device type (the
CPU and CUDA generators differ), and always drawn in float32, then cast.

``"gaussian-table"`` trades some independence for speed, as the shared noise table of
Salimans et al. (2017, "Evolution Strategies as a Scalable Alternative to Reinforcement
Learning") does: once per seed and device, ``TABLE_SIZE`` Gaussian numbers are drawn (themselves
keyed as above), and a block's noise is the slice of that table at an offset given by the block's
key. Drawing is then a copy (about 7x cheaper than ``normal_`` on the 2-core CPU) and all the above
still holds, but two blocks of ``n`` numbers overlap with probability about ``2 n /
TABLE_SIZE`` (3% for whole blocks) and the table costs ``4 * TABLE_SIZE`` bytes (64 MiB) per
device. Good for dense ES on models up to a few million parameters; not for MeZO at
inference memory.

``"gaussian-counter"`` draws exact Gaussians (Box-Muller) from a counter-based generator: the
splitmix64 finaliser of ``key + i`` gives the uniform bits of pair ``i`` of a block. It is a
handful of integer and float operations per number that the compiler fuses into one kernel
writing the block: under 1 ns per number against 5.3 ns for ``normal_`` (whose Mersenne Twister
alone takes 4 ns) on one CPU thread here, with no table. On the CPU the kernel is compiled ahead
of time in a child process and cached (:mod:`nograd.core.counter_kernel`: the first use on a
machine waits for that build, 10-20 s), so inductor's memory stays out of the process. Elsewhere,
or when that build fails, ``torch.compile`` builds it in the process; without a working compiler
it runs eagerly, with one warning, at about 20-50 ns per number. Eager and compiled results agree
to float rounding (1e-6), not bit for bit, and so do different devices: a run keeps the same
kernel throughout.

Example:
    >>> noise = SeededNoise(seed=0)
    >>> a = noise.full((3, 4), generation=1, member=2, index=0)
    >>> b = noise.full((3, 4), generation=1, member=2, index=0)
    >>> bool((a == b).all())
    True
    >>> A, B = noise.lowrank(5, 4, rank=2, generation=1, member=0, index=3)
    >>> tuple(A.shape), tuple(B.shape)
    ((5, 2), (4, 2))
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from .compiling import CompiledOrEager
from .counter_kernel import as_int64, counter_gaussians, load_cpu_kernel

BLOCK = 1 << 18  # elements per independently keyed block of a tensor's noise
GROUP = 32  # members whose noise for a small tensor comes from one draw
SMALL = BLOCK // GROUP  # tensors up to this many elements are drawn GROUP members at a time
_GROUP_TAG = (1 << 64) - 1  # stands where a block number would, so group keys never equal block keys
DISTRIBUTIONS = ("gaussian", "rademacher", "gaussian-table", "gaussian-counter")
TABLE_SIZE = 1 << 24  # numbers in the "gaussian-table" noise table
_TABLE_TAG = (1 << 64) - 2  # the table's own key, never a generation/member/index/block key
_tables: dict[tuple[int, str], torch.Tensor] = {}  # (seed, device) -> table, shared by instances
_tables_lock = threading.Lock()  # fill_'s worker threads may ask for a table at the same time

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_key(*parts: int) -> int:
    """Hash integers into one 63-bit generator seed (order matters)."""
    h = 0x2545F4914F6CDD1D
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def _consecutive(xs: list[int]) -> bool:
    return xs == list(range(xs[0], xs[0] + len(xs)))


def mirrored(member: int) -> tuple[int, float]:
    """Antithetic pairing: members 2k and 2k+1 use direction k with signs +1 and -1."""
    return member // 2, (1.0 if member % 2 == 0 else -1.0)


class SeededNoise:
    """Deterministic noise keyed by (seed, generation, member, index): Gaussian, Rademacher, or
    Gaussian read from a seeded table (``"gaussian-table"``, see the module docstring)."""

    def __init__(self, seed: int = 0, distribution: str = "gaussian", threads: int | None = None) -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"noise distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        self.seed = int(seed)
        self.distribution = distribution
        # torch's CPU generator is single-threaded; independent blocks let threads share the work.
        self.threads = max(1, threads if threads is not None else torch.get_num_threads())
        self._generators: dict[str, torch.Generator] = {}
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict:
        return {"seed": self.seed, "distribution": self.distribution, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def key(self, generation: int, member: int, index: int, block: int = 0) -> int:
        return derive_key(self.seed, generation, member, index, block)

    def _generator(self, device: torch.device, key: int) -> torch.Generator:
        name = str(device)
        g = self._generators.get(name)
        if g is None:
            g = torch.Generator(device=device)
            self._generators[name] = g
        return g.manual_seed(key)

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The ``"gaussian-table"`` table for this seed on ``device`` (made on first use)."""
        device = torch.device(device)
        name = (self.seed, str(device))
        with _tables_lock:
            if name not in _tables:
                plain = SeededNoise(self.seed, "gaussian", self.threads)
                t = torch.empty(TABLE_SIZE, device=device, dtype=torch.float32)
                _tables[name] = plain.fill_(t, generation=0, member=0, index=_TABLE_TAG)
            return _tables[name]

    def _draw(self, out: torch.Tensor, key: int, generator: torch.Generator | None = None) -> None:
        if self.distribution == "gaussian-counter":
            base = torch.tensor(as_int64(key))
            kernel = load_cpu_kernel() if out.device.type == "cpu" else None
            if kernel is None:
                _counter_fill()(out.view(-1), base)
            else:  # compiled ahead of time: no inductor in this process
                n = out.numel()
                out.view(-1).copy_(kernel(base, (n + 1) // 2)[:n])
            return
        if self.distribution == "gaussian-table":
            n = out.numel()
            start = key % (TABLE_SIZE - n + 1)
            out.copy_(self.table(out.device)[start : start + n].view(out.shape))
            return
        g = generator.manual_seed(key) if generator is not None else self._generator(out.device, key)
        if self.distribution == "gaussian":
            out.normal_(generator=g)
        else:
            out.bernoulli_(0.5, generator=g).mul_(2.0).sub_(1.0)

    def fill_(
        self, out: torch.Tensor, *, generation: int, member: int, index: int, start_block: int = 0
    ) -> torch.Tensor:
        """Fill a contiguous float32 1-D tensor with the noise of blocks ``start_block, ...``."""
        n = out.numel()
        starts = list(range(0, n, BLOCK))
        keys = [self.key(generation, member, index, start_block + i) for i in range(len(starts))]
        serial = self.threads == 1 or out.device.type != "cpu" or self.distribution == "gaussian-counter"
        if len(starts) == 1 or serial:  # (the counter kernel runs on torch's own threads)
            for s, k in zip(starts, keys):
                self._draw(out[s : s + BLOCK], k)
            return out
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads)
        per_thread = [torch.Generator() for _ in range(self.threads)]

        def work(t: int) -> None:
            for j in range(t, len(starts), self.threads):
                self._draw(out[starts[j] : starts[j] + BLOCK], keys[j], per_thread[t])

        list(self._pool.map(work, range(self.threads)))
        return out

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
        """The dense noise tensor of one member for one parameter."""
        n = torch.Size(shape).numel()
        if n <= SMALL:
            return self.members(shape, generation=generation, members=[member], index=index, device=device)[
                0
            ].to(dtype)
        out = torch.empty(n, device=device, dtype=torch.float32)
        self.fill_(out, generation=generation, member=member, index=index)
        return out.view(shape).to(dtype)

    def members(
        self,
        shape: torch.Size | tuple[int, ...],
        *,
        generation: int,
        members: list[int] | range,
        index: int,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Noise of several members for one parameter, stacked: ``(len(members), *shape)`` float32."""
        shape = torch.Size(shape)
        n = shape.numel()
        if n > SMALL:  # each member's blocks straight into its row: no per-member tensors to stack
            out = torch.empty(len(members), n, device=device, dtype=torch.float32)
            for row, m in zip(out, members):
                self.fill_(row, generation=generation, member=m, index=index)
            return out.view(len(members), *shape)
        ids = list(members)
        positions: dict[int, list[int]] = {}  # group -> positions of its members in ``ids``
        for pos, m in enumerate(ids):
            positions.setdefault(m // GROUP, []).append(pos)
        out = torch.empty(len(ids), n, device=device, dtype=torch.float32)
        draw = None
        for g, pos in positions.items():
            key = derive_key(self.seed, generation, g, index, _GROUP_TAG)
            rows = [ids[p] % GROUP for p in pos]
            if len(pos) == GROUP and _consecutive(pos) and rows[0] == 0 and _consecutive(rows):
                self._draw(out[pos[0] : pos[0] + GROUP].view(-1), key)  # a whole group: in place
                continue
            if draw is None:
                draw = torch.empty(GROUP, n, device=device, dtype=torch.float32)
            self._draw(draw.view(-1), key)
            if _consecutive(pos) and _consecutive(rows):  # the usual case: a slice, no index ops
                out[pos[0] : pos[0] + len(pos)] = draw[rows[0] : rows[0] + len(rows)]
            else:
                where = torch.tensor(pos, device=device)
                out.index_copy_(0, where, draw.index_select(0, torch.tensor(rows, device=device)))
        return out.view(len(ids), *shape)

    def add_members_(
        self,
        out: torch.Tensor,
        alpha: float,
        *,
        generation: int,
        members: list[int] | range,
        index: int,
    ) -> torch.Tensor:
        """``out[j] += alpha * members((n,), ...)[j]`` in place, for ``out`` ``(len(members), n)``.

        No ``(len(members), n)`` draw is made: ``"gaussian-table"`` blocks are added straight from
        the table, the other kinds are drawn one block at a time into a scratch buffer.
        """
        k, n = out.shape
        if k != len(members):
            raise ValueError(f"out has {k} rows for {len(members)} members")
        if n <= SMALL:
            noise = self.members((n,), generation=generation, members=members, index=index, device=out.device)
            return out.add_(noise, alpha=alpha)
        for row, m in zip(out, members):
            self._add_blocks(row, alpha, generation, m, index)
        return out

    def accumulate_(
        self,
        out: torch.Tensor,
        weights: list[float],
        *,
        generation: int,
        members: list[int] | range,
        index: int,
        squares: torch.Tensor | None = None,
        square_weights: list[float] | None = None,
    ) -> torch.Tensor:
        """``out += Σ_j weights[j] * z_j`` in place, ``z_j = members((n,), ...)[j]``, for ``out`` ``(n,)``: a
        weighted sum over members without drawing them all (see :meth:`add_members_`). With
        ``squares`` (``(n,)``) also ``squares += Σ_j square_weights[j] * z_j^2``, from the same read of
        each block."""
        (n,) = out.shape
        if len(weights) != len(members):
            raise ValueError(f"{len(weights)} weights for {len(members)} members")
        if squares is not None and (square_weights is None or len(square_weights) != len(members)):
            raise ValueError("squares needs one square weight per member")
        if n <= SMALL:
            noise = self.members((n,), generation=generation, members=members, index=index, device=out.device)
            out.add_(torch.as_tensor(weights, dtype=noise.dtype, device=out.device) @ noise)
            if squares is not None:
                v = torch.as_tensor(square_weights, dtype=noise.dtype, device=out.device)
                squares.add_(v @ noise.square())
            return out
        v_all = [0.0] * len(weights) if squares is None else square_weights
        scratch = self._scratch(n, out.device)
        for w, v, m in zip(weights, v_all, members):
            w, v = float(w), float(v)
            if w == 0.0 and v == 0.0:
                continue
            for start, z in self.member_blocks(n, generation, m, index, out.device, scratch):
                end = start + z.numel()
                if w != 0.0:
                    out[start:end].add_(z, alpha=w)
                if v != 0.0:
                    squares[start:end].addcmul_(z, z, value=v)
        return out

    def affine_members_(
        self,
        out: torch.Tensor,
        loc: torch.Tensor,
        scale: torch.Tensor | float,
        *,
        generation: int,
        members: list[int] | range,
        index: int,
        signs: list[float] | None = None,
    ) -> torch.Tensor:
        """``out[j] = loc + signs[j] * scale * z_j`` (``scale`` a tensor ``(n,)``, elementwise, or a
        number) for ``out`` ``(len(members), n)``, ``z_j = members((n,), ...)[j]``: each row written in
        one pass, with ``"gaussian-table"`` blocks read straight from the table (no draw at all) and
        the other kinds drawn a block at a time. The same numbers as the two steps written out."""
        k, n = out.shape
        if k != len(members):
            raise ValueError(f"out has {k} rows for {len(members)} members")
        signs = [1.0] * k if signs is None else [float(s) for s in signs]
        if n <= SMALL:
            z = self.members((n,), generation=generation, members=members, index=index, device=out.device)
            z = z.to(out.dtype) * torch.tensor(signs, dtype=out.dtype, device=out.device).unsqueeze(1)
            if isinstance(scale, torch.Tensor):
                return torch.addcmul(loc.to(out.dtype), scale.to(out.dtype), z, out=out)
            return torch.add(loc.to(out.dtype), z, alpha=float(scale), out=out)
        scratch = self._scratch(n, out.device)
        for row, m, sign in zip(out, members, signs):
            for start, z in self.member_blocks(n, generation, m, index, out.device, scratch):
                end = start + z.numel()
                if isinstance(scale, torch.Tensor):
                    torch.addcmul(loc[start:end], scale[start:end], z, value=sign, out=row[start:end])
                else:
                    torch.add(loc[start:end], z, alpha=sign * float(scale), out=row[start:end])
        return out

    def reads_in_place(self, index: int) -> bool:
        """Whether tensor ``index``'s noise is the shared table's own slices, which :meth:`add_`,
        :meth:`accumulate_` and :meth:`affine_members_` read where they lie instead of drawing."""
        return self.distribution == "gaussian-table"

    def add_(
        self, out: torch.Tensor, alpha: float, *, generation: int, member: int, index: int
    ) -> torch.Tensor:
        """``out += alpha * full(out.shape, ...)`` in place, a few blocks of noise at a time (the
        table's slices read in place where :meth:`reads_in_place`): no tensor-sized draw."""
        flat = out.view(-1)
        if flat.numel() > SMALL and self.reads_in_place(index):
            self._add_blocks(flat, alpha, generation, member, index)
            return out
        for start, z in self.full_chunks(
            flat.numel(), generation=generation, member=member, index=index, device=flat.device
        ):
            flat[start : start + z.numel()].add_(z, alpha=alpha)
        return out

    def member_blocks(
        self,
        n: int,
        generation: int,
        member: int,
        index: int,
        device: torch.device | str = "cpu",
        scratch: torch.Tensor | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, z)`` over the blocks :meth:`fill_` writes for one member's ``n`` numbers: for
        ``"gaussian-table"`` the slice of the table it would copy (a view, read in place), for the
        other kinds the block drawn into ``scratch`` (valid until the next one). These are the
        numbers of :meth:`members` only for ``n > SMALL`` (smaller tensors are drawn by groups)."""
        table = self.table(device) if self.distribution == "gaussian-table" else None
        for block, start in enumerate(range(0, n, BLOCK)):
            size = min(BLOCK, n - start)
            key = self.key(generation, member, index, block)
            if table is not None:
                offset = key % (TABLE_SIZE - size + 1)
                yield start, table[offset : offset + size]
                continue
            scratch = self._scratch(n, device) if scratch is None else scratch
            self._draw(scratch[:size], key)
            yield start, scratch[:size]

    def _scratch(self, n: int, device: torch.device | str) -> torch.Tensor | None:
        """A block's buffer for :meth:`member_blocks` (None with the table, which needs none)."""
        return None if self.distribution == "gaussian-table" else torch.empty(min(n, BLOCK), device=device)

    def _add_blocks(self, row: torch.Tensor, alpha: float, generation: int, member: int, index: int) -> None:
        """``row += alpha *`` the member's noise, block by block (``row`` 1-D, longer than ``SMALL``)."""
        for start, z in self.member_blocks(row.numel(), generation, member, index, row.device):
            row[start : start + z.numel()].add_(z, alpha=alpha)

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
        """Yield ``(start, noise)`` over a flattened tensor, ``chunk_blocks`` blocks at a time.

        The concatenation equals ``full(...).flatten()``; only one chunk is alive at a time.
        """
        if numel <= SMALL:
            yield 0, self.full((numel,), generation=generation, member=member, index=index, device=device)
            return
        step = BLOCK * max(1, chunk_blocks)
        buf = torch.empty(min(step, numel), device=device, dtype=torch.float32)
        for start in range(0, numel, step):
            part = buf[: min(step, numel - start)]
            self.fill_(part, generation=generation, member=member, index=index, start_block=start // BLOCK)
            yield start, part

    def lowrank(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        *,
        generation: int,
        member: int,
        index: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors ``A`` (out x r) and ``B`` (in x r) of the EGGROLL perturbation ``E = A B^T / sqrt(r)``."""
        a, b = self.lowrank_members(
            out_features,
            in_features,
            rank,
            generation=generation,
            members=[member],
            index=index,
            device=device,
        )
        return a[0].to(dtype), b[0].to(dtype)

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
        """Stacked factors of several members: ``(k, out, r)`` and ``(k, in, r)``, float32."""
        shape = ((out_features + in_features) * rank,)
        flat = self.members(shape, generation=generation, members=members, index=index, device=device)
        return split_factors(flat, out_features, in_features, rank)


def split_factors(
    flat: torch.Tensor, out_features: int, in_features: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's draw of ``(out + in) * r`` numbers as its factors ``(k, out, r)``, ``(k, in, r)``."""
    a, b = flat.split([out_features * rank, in_features * rank], dim=1)
    k = flat.shape[0]
    return a.reshape(k, out_features, rank), b.reshape(k, in_features, rank)


# ---------------------------------------------------------------- the counter-based generator


def _counter_gaussian_fill(out: torch.Tensor, base: torch.Tensor) -> None:
    """``out`` (1-D float32) <- Box-Muller Gaussians of the uniform bits ``mix64(base + i)``:
    pair ``i`` gives ``out[i] = r cos(t)`` and ``out[h + i] = r sin(t)``, ``h = ceil(n / 2)``."""
    n = out.shape[0]
    out.copy_(counter_gaussians(base.to(out.device), (n + 1) // 2)[:n])


_compiled_fill: list[CompiledOrEager] = []  # the kernel, built on first use


def _counter_fill() -> CompiledOrEager:
    """The compiled counter kernel (built on first use); eager, with one warning, if compiling fails."""
    if not _compiled_fill:
        _compiled_fill.append(
            CompiledOrEager(
                _counter_gaussian_fill,
                what="gaussian-counter noise",
                instead="drawing it eagerly (slower)",
                stacklevel=4,
                dynamic=True,
            )
        )
    return _compiled_fill[0]
