"""Engine: seeded noise, exact in-place perturbation, batched population, estimates."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import nograd.core.engine as engine
from nograd.core.engine import (
    BatchedPerturbation,
    InPlacePerturbation,
    ParamSpace,
    _mirrored_pair_scale,
    accumulate,
    evaluate_population,
    member_directions,
)
from nograd.core.noise import BLOCK, SMALL, TABLE_SIZE, SeededNoise, mirrored
from nograd.core.shaping import NonFiniteFitnessError, centered_ranks, sanitize, shape, zscore


class Scaled(nn.Module):
    """A layer the batched engine has no fast path for (a raw parameter in its own forward)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.inner = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.scale)


def tiny_lm(vocab: int = 13, dim: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(vocab, dim),
        nn.LayerNorm(dim),
        nn.Linear(dim, 2 * dim),
        nn.GELU(),
        nn.Linear(2 * dim, dim, bias=False),
        nn.RMSNorm(dim),
        Scaled(dim),
        nn.Linear(dim, vocab),
    )


def materialised(
    model: nn.Module, space: ParamSpace, noise: SeededNoise, gen: int, direction: int, scale: float
):
    """Reference: evaluate the model with W + scale * E written into its weights."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            backup = [p.clone() for p in space.tensors]
            for i, p in enumerate(space.tensors):
                p.add_(space.dense(noise, i, gen, direction) * scale)
            try:
                return model(x)
            finally:
                for p, b in zip(space.tensors, backup):
                    p.copy_(b)

    return run


# ---------------------------------------------------------------- noise
@pytest.mark.parametrize("distribution", ["gaussian", "gaussian-table", "gaussian-counter"])
def test_noise_independent_of_chunking_and_order(distribution: str):
    noise = SeededNoise(seed=5, distribution=distribution)
    n = 3 * BLOCK + 123
    whole = noise.full((n,), generation=2, member=7, index=4)
    for chunk_blocks in (1, 2, 5):
        parts = torch.cat(
            [
                z.clone()
                for _, z in noise.full_chunks(n, generation=2, member=7, index=4, chunk_blocks=chunk_blocks)
            ]
        )
        assert torch.equal(parts, whole)
    single = SeededNoise(5, distribution, threads=1).full((n,), generation=2, member=7, index=4)
    assert torch.equal(single, whole)
    # visiting other members first changes nothing
    noise.full((50,), generation=2, member=3, index=4)
    assert torch.equal(noise.full((n,), generation=2, member=7, index=4), whole)
    assert not torch.equal(noise.full((n,), generation=2, member=8, index=4), whole)


def test_small_tensor_noise_same_alone_or_stacked():
    noise = SeededNoise(3)
    ids = [70, 1, 33, 2, 64]  # spans three groups, out of order
    stacked = noise.members((5, 4), generation=9, members=ids, index=1)
    for row, m in zip(stacked, ids):
        assert torch.equal(row, noise.full((5, 4), generation=9, member=m, index=1))
    a, b = noise.lowrank_members(6, 4, 2, generation=9, members=ids, index=2)
    a1, b1 = noise.lowrank(6, 4, 2, generation=9, member=33, index=2)
    assert torch.equal(a[2], a1) and torch.equal(b[2], b1)
    assert not torch.equal(stacked[0], stacked[1])
    big = noise.members((SMALL + 5,), generation=9, members=ids, index=3)  # drawn per member
    for row, m in zip(big, ids):
        assert torch.equal(row, noise.full((SMALL + 5,), generation=9, member=m, index=3))
    run = list(range(30, 70))  # in order, across two group boundaries: copied as slices
    stacked = noise.members((3,), generation=9, members=run, index=1)
    for row, m in zip(stacked, run):
        assert torch.equal(row, noise.full((3,), generation=9, member=m, index=1))


def test_noise_same_across_processes():
    code = (
        "import torch; from nograd.core.noise import SeededNoise;"
        "z = SeededNoise(11).full((1000,), generation=3, member=1, index=2);"
        "print(repr(z.double().sum().item()), repr(z[:3].tolist()))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    z = SeededNoise(11).full((1000,), generation=3, member=1, index=2)
    assert outs == {f"{z.double().sum().item()!r} {z[:3].tolist()!r}\n"}


def test_noise_distributions():
    g = SeededNoise(0).full((200_000,), generation=0, member=0, index=0)
    assert abs(g.mean()) < 0.01 and abs(g.std() - 1) < 0.01
    r = SeededNoise(0, "rademacher").full((200_000,), generation=0, member=0, index=0)
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.01
    a, b = SeededNoise(0).lowrank(7, 5, 3, generation=0, member=0, index=0)
    assert a.shape == (7, 3) and b.shape == (5, 3)
    with pytest.raises(ValueError, match="distribution"):
        SeededNoise(0, "uniform")


def test_counter_noise_is_gaussian_and_its_kernel_is_the_written_formula():
    import math

    from nograd.core.counter_kernel import mix64

    z = SeededNoise(0, "gaussian-counter").full((1_000_003,), generation=1, member=2, index=3)
    x = z.double()
    assert abs(x.mean()) < 0.005 and abs(x.std() - 1) < 0.005
    assert abs((x**3).mean()) < 0.01 and abs((x**4).mean() - 3) < 0.03  # skew 0, kurtosis 3
    for level, p in ((-1.0, 0.158655), (0.0, 0.5), (1.96, 0.975002)):  # the normal CDF
        assert abs(float((x <= level).double().mean()) - p) < 0.002
    # a block by hand (a tensor above SMALL: one block keyed by its own key; smaller ones are
    # drawn GROUP members at a time): Box-Muller of the mixed key + i, the cos half, then the sin half
    n = SMALL + 1001
    noise = SeededNoise(7, "gaussian-counter")
    block = noise.full((n,), generation=0, member=0, index=0)
    key = noise.key(0, 0, 0, 0)
    key = key - (1 << 64) if key >= 1 << 63 else key
    h = (n + 1) // 2
    bits = mix64(torch.tensor([key], dtype=torch.int64) + torch.arange(h))
    u1 = (((bits >> 40) & 0xFFFFFF).double() + 0.5) / (1 << 24)
    u2 = ((bits >> 16) & 0xFFFFFF).double() * (2 * math.pi / (1 << 24))
    r = torch.sqrt(-2 * torch.log(u1))
    expected = torch.cat([r * torch.cos(u2), r * torch.sin(u2)])[:n]
    torch.testing.assert_close(block.double(), expected, atol=2e-5, rtol=1e-5)
    samples = [0, 1, 12345, key, -(1 << 63), (1 << 63) - 1]
    mixed = mix64(torch.tensor(samples, dtype=torch.int64)).tolist()
    assert mixed == [_splitmix64_finaliser(v) for v in samples]  # wrapping int64 = the 64-bit hash


def _splitmix64_finaliser(x: int) -> int:
    """x times the golden ratio, then splitmix64's mixing, in Python's unbounded ints (signed result)."""
    mask = (1 << 64) - 1
    x = ((x & mask) * 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return x - (1 << 64) if x >= 1 << 63 else x


def test_table_noise_is_slices_of_one_seeded_table():
    noise = SeededNoise(4, "gaussian-table")
    table = noise.table()
    assert table.shape == (TABLE_SIZE,) and abs(table.mean()) < 0.01 and abs(table.std() - 1) < 0.01
    assert SeededNoise(4, "gaussian-table").table() is table  # one table per seed and device
    assert not torch.equal(SeededNoise(5, "gaussian-table").table()[:100], table[:100])
    # each block is the table's slice at an offset given by the block's key
    n = BLOCK + 10
    z = noise.full((n,), generation=3, member=1, index=2)
    for block, start in ((0, 0), (1, BLOCK)):
        size = min(BLOCK, n - start)
        offset = noise.key(3, 1, 2, block) % (TABLE_SIZE - size + 1)
        assert torch.equal(z[start : start + size], table[offset : offset + size])
    # other members, generations and tensors read elsewhere
    assert not torch.equal(noise.full((n,), generation=3, member=2, index=2), z)
    assert not torch.equal(noise.full((n,), generation=4, member=1, index=2), z)


@pytest.mark.parametrize("kind", ["gaussian", "gaussian-table", "gaussian-counter"])
@pytest.mark.parametrize("n", [SMALL // 2, BLOCK + 10])
def test_adding_and_summing_members_noise_in_place_equals_drawing_it(kind: str, n: int):
    """add_members_ and accumulate_ read each member's blocks (the table's slices in place) and give
    what members() draws, for small tensors (group draws) and tensors of several blocks."""
    noise = SeededNoise(2, kind)
    ids = [5, 0, 33, 2]
    drawn = noise.members((n,), generation=7, members=ids, index=3)
    base = torch.randn(len(ids), n)
    out = noise.add_members_(base.clone(), 0.25, generation=7, members=ids, index=3)
    torch.testing.assert_close(out, base + 0.25 * drawn, rtol=0, atol=1e-6)
    weights = [0.5, -1.0, 2.0, 0.125]
    acc = noise.accumulate_(torch.ones(n), weights, generation=7, members=ids, index=3)
    torch.testing.assert_close(acc, 1 + torch.tensor(weights) @ drawn, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="rows for"):
        noise.add_members_(base, 1.0, generation=7, members=ids[:2], index=3)


@pytest.mark.parametrize("kind", ["gaussian", "gaussian-table", "gaussian-counter"])
@pytest.mark.parametrize("n", [SMALL // 2, BLOCK + 10])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_affine_rows_and_squared_sums_in_one_read_equal_the_written_out_steps(kind, n, dtype):
    """affine_members_ writes ``loc + s_j scale z_j`` row by row from each member's blocks (the
    table's slices in place) with the bits of drawing ``z`` and then computing it; accumulate_'s
    squared sums come from the same read as its plain sums."""
    noise = SeededNoise(4, kind)
    ids, signs = [3, 0, 40, 7], [1.0, -1.0, -1.0, 1.0]
    z = noise.members((n,), generation=5, members=ids, index=1).to(dtype)
    loc, scale = torch.randn(n, dtype=dtype), torch.rand(n, dtype=dtype)
    out = torch.empty(len(ids), n, dtype=dtype)
    noise.affine_members_(out, loc, scale, generation=5, members=ids, index=1, signs=signs)
    assert torch.equal(out, torch.addcmul(loc, scale, z * torch.tensor(signs, dtype=dtype).unsqueeze(1)))
    noise.affine_members_(out, loc, 0.3, generation=5, members=ids, index=1)
    assert torch.equal(out, torch.add(loc, z, alpha=0.3))
    w, v = [0.5, -1.0, 0.0, 0.25], [0.0, 2.0, 0.0, -0.5]
    s1, s2 = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
    noise.accumulate_(s1, w, generation=5, members=ids, index=1, squares=s2, square_weights=v)
    z32 = z.float()
    torch.testing.assert_close(s1, (torch.tensor(w) @ z32).to(dtype), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(s2, (torch.tensor(v) @ z32.square()).to(dtype), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="square weight"):
        noise.accumulate_(s1, w, generation=5, members=ids, index=1, squares=s2)


def test_table_blocks_are_the_slices_a_draw_copies_read_in_place():
    noise = SeededNoise(9, "gaussian-table")
    n = 2 * BLOCK + 5
    drawn = noise.full((n,), generation=2, member=4, index=1)
    table = noise.table()
    starts = []
    for start, z in noise.member_blocks(n, 2, 4, 1):
        assert z.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()  # a view
        assert torch.equal(z, drawn[start : start + z.numel()])
        starts.append(start)
    assert starts == [0, BLOCK, 2 * BLOCK]
    small = noise.member_blocks(SMALL, 2, 4, 1)  # fill_'s keys at any size
    assert torch.equal(next(small)[1], noise.fill_(torch.empty(SMALL), generation=2, member=4, index=1))


def test_antithetic_pairs_are_exact_negatives():
    assert [mirrored(m) for m in range(4)] == [(0, 1.0), (0, -1.0), (1, 1.0), (1, -1.0)]
    model = tiny_lm()
    space, noise = ParamSpace(model, rank=2), SeededNoise(3)
    x = torch.randint(0, 13, (2, 4))
    dirs = member_directions(range(2), 1e-3)
    assert dirs[0][0] == dirs[1][0] and dirs[0][1] == -dirs[1][1]
    base = model(x).detach()
    with BatchedPerturbation(model, space, noise).apply(0, dirs):
        out = model(x.repeat(2, 1)).view(2, 2, 4, -1)
    # to first order the two members move the output in opposite directions by the same amount
    up, down = out[0] - base, out[1] - base
    assert up.abs().max() > 1e-4
    assert (up + down).abs().max() < 0.05 * up.abs().max()
    for i in range(len(space)):
        e = space.dense(noise, i, 0, dirs[0][0])
        assert torch.equal(e * dirs[0][1], -(e * dirs[1][1]))


# ---------------------------------------------------------------- batched population
@pytest.mark.parametrize("rank", [0, 1, 3])
@pytest.mark.parametrize("mirrored", [True, False])
@pytest.mark.parametrize("seqs", [1, 3])  # 5 rows per member, or 15: dense weights written per member
def test_batched_member_equals_materialised(rank: int, mirrored: bool, seqs: int):
    model = tiny_lm()
    space, noise = ParamSpace(model, rank=rank), SeededNoise(1)
    batched = BatchedPerturbation(model, space, noise)
    assert [type(m).__name__ for m in batched.fallback] == ["Scaled"]
    x = torch.randint(0, 13, (seqs, 5))
    # mirrored pairs take the shared-direction path for dense matrices; any other list the general one
    dirs = member_directions(range(6), 0.05) if mirrored else [(0, 0.05), (2, -0.03), (0, -0.05)] * 2
    with batched.apply(4, dirs):
        out = model(x.repeat(6, 1)).view(6, seqs, 5, -1)
    for m, (d, s) in enumerate(dirs):
        ref = materialised(model, space, noise, 4, d, s)(x)
        assert torch.allclose(out[m], ref, atol=1e-5), (m, (out[m] - ref).abs().max())


def test_mirrored_pairs_detected():
    assert _mirrored_pair_scale(member_directions(range(6), 0.05)) == 0.05
    assert _mirrored_pair_scale([(0, 0.05), (2, -0.03), (0, -0.05)] * 2) is None
    assert _mirrored_pair_scale([(0, 0.1), (0, -0.1), (0, 0.1), (0, -0.1)]) is None  # repeated direction
    assert _mirrored_pair_scale([(0, 0.1), (0, -0.2)]) is None
    assert _mirrored_pair_scale([(0, 0.1)]) is None


def test_batched_hooks_removed_and_weights_untouched():
    model = tiny_lm()
    before = [p.clone() for p in model.parameters()]
    x = torch.randint(0, 13, (2, 3))
    plain = model(x)
    space = ParamSpace(model, rank=1)
    with BatchedPerturbation(model, space, SeededNoise(0)).apply(0, member_directions(range(4), 0.1)):
        model(x.repeat(4, 1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(model(x), plain)


def test_batched_rejects_bad_batch():
    model = tiny_lm()
    space = ParamSpace(model, rank=1)
    with BatchedPerturbation(model, space, SeededNoise(0)).apply(0, member_directions(range(4), 0.1)):
        with pytest.raises(ValueError, match="multiple of 4 members"):
            model(torch.randint(0, 13, (6, 3)))


def test_population_chunking_is_identical():
    model = tiny_lm()
    space, noise = ParamSpace(model, rank=2), SeededNoise(9)
    batched = BatchedPerturbation(model, space, noise)
    x = torch.randint(0, 13, (4, 6))
    y = torch.randint(0, 13, (4, 6))

    def loss(rows: torch.Tensor) -> torch.Tensor:
        k = rows.shape[0] // x.shape[0]
        logits = model(rows)
        return nn.functional.cross_entropy(logits.transpose(1, 2), y.repeat(k, 1), reduction="none").mean(1)

    full = evaluate_population(batched, 1, 8, 0.1, loss, x)
    for chunk in (1, 2, 6):
        assert torch.allclose(
            evaluate_population(batched, 1, 8, 0.1, loss, x, chunk_size=chunk), full, atol=1e-6
        )
    with pytest.raises(ValueError, match="even"):
        evaluate_population(batched, 1, 7, 0.1, loss, x)
    with pytest.raises(ValueError, match="sigma"):
        evaluate_population(batched, 1, 8, 0.0, loss, x)


# ---------------------------------------------------------------- in-place perturbation
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inplace_restore_bit_exact_after_1000_cycles(dtype: torch.dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4)).to(dtype)
    original = [p.clone() for p in model.parameters()]
    for rank in (0, 2):
        space, noise = ParamSpace(model, rank=rank), SeededNoise(2)
        perturb = InPlacePerturbation(space, noise, module=model)
        x = torch.randn(3, 16, dtype=dtype)
        plain = model(x)
        seen_change = False
        for cycle in range(1000 if rank == 0 else 200):
            with perturb.apply(cycle, cycle % 7, 1e-3 if cycle % 2 else -1e-3):
                out = model(x)
            seen_change |= not torch.equal(out, plain)
        assert seen_change  # the perturbation really was applied
        assert all(torch.equal(a, b) for a, b in zip(original, model.parameters()))


def test_inplace_matches_materialised_and_ties():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight  # tied
    model = nn.Sequential(emb, nn.Tanh(), head)
    space, noise = ParamSpace(model, rank=0), SeededNoise(4)
    assert len(space) == 1
    x = torch.randint(0, 10, (2, 3))
    with InPlacePerturbation(space, noise, module=model).apply(3, 1, 0.2):
        out = model(x)
    ref = materialised(model, space, noise, 3, 1, 0.2)(x)
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize(
    "scaled, dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)]
)
def test_large_linear_and_embedding_weights_are_perturbed_in_their_outputs(monkeypatch, scaled, dtype):
    # Weights over STREAMED_BYTES are never written: their layers add the perturbation's part to
    # their outputs a few rows of noise at a time, with the same numbers as the materialised E.
    import nograd.core.engine as engine
    from nograd.zo.base import ScaledView

    monkeypatch.setattr(engine, "STREAMED_BYTES", 0)
    monkeypatch.setattr(engine, "ROW_BLOCK_NUMEL", 7 * 6)  # several row blocks, cut across noise chunks
    torch.manual_seed(0)
    emb = nn.Embedding(300, 6)
    head = nn.Linear(6, 300, bias=False)
    head.weight = emb.weight  # tied, as in a Llama or GPT
    model = nn.Sequential(emb, nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), head).to(dtype)
    space, noise = ParamSpace(model, rank=0), SeededNoise(4)
    view = space
    if scaled:  # per-tensor scales and a HiZOO Hessian, as the ZO methods see the space
        view = ScaledView(space)
        view.scales = [0.5, 2.0, 1.5]
        view.hessian = [torch.rand_like(p) + 0.5 for p in space.tensors]
    assert space.streamable(0) and space.streamable(1) and not space.streamable(2)
    x = torch.randint(0, 300, (4, 5))
    before = [p.detach().clone() for p in model.parameters()]
    writes = {id(p): p._version for p in model.parameters()}
    perturb = InPlacePerturbation(view, noise, module=model)
    with perturb.apply(3, 1, 0.2):
        out = model(x)
        # the tied embedding and the other large matrix were not written; the bias was
        assert model[0].weight._version == writes[id(model[0].weight)]
        assert model[2].weight._version == writes[id(model[2].weight)]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(space.tensors, reference.parameters()):
            i = space.index_of[id(p)]
            e = space.dense(noise, i, 3, 1) * (view.scales[i] if scaled else 1.0)
            if scaled:
                e = e / view.hessian[i].sqrt()
            q.add_(0.2 * e)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bfloat16: the reference's weights are rounded
    torch.testing.assert_close(out, reference(x), atol=tol, rtol=tol)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_inplace_discovery_and_raw_tensors():
    # raw tensors used outside any module forward are perturbed for the whole closure
    w = torch.zeros(5, requires_grad=True)
    space, noise = ParamSpace([w]), SeededNoise(0)
    perturb = InPlacePerturbation(space, noise)
    assert perturb.needs_discovery
    perturb.discover(lambda: (w**2).sum())
    assert perturb.unowned == [0]
    with perturb.apply(0, 0, 1.0):
        seen = w.detach().clone()
    assert torch.equal(seen, noise.full((5,), generation=0, member=0, index=0))
    assert torch.equal(w, torch.zeros(5))


def test_inplace_restores_after_exception():
    model = nn.Linear(4, 4)
    before = model.weight.detach().clone()
    perturb = InPlacePerturbation(ParamSpace(model), SeededNoise(0), module=model)
    with pytest.raises(RuntimeError, match="boom"):
        with perturb.apply(0, 0, 0.5):
            model(torch.randn(1, 4))
            raise RuntimeError("boom")
    assert torch.equal(model.weight, before)


# ---------------------------------------------------------------- estimates
# dense tensors: all directions stacked / 5-number vectors two directions per chunk and the 30-number
# weight one direction at a time / every tensor one direction at a time
@pytest.mark.parametrize("dense_stack", [1 << 22, 12, 1])
def test_accumulate_grad_equals_update_and_manual_sum(dense_stack: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(engine, "DENSE_STACK", dense_stack)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    for rank in (0, 2):
        space, noise = ParamSpace(model, rank=rank), SeededNoise(1)
        coeffs = [(0, 0.5), (1, -1.25), (2, 2.0)]
        accumulate(space, noise, 3, coeffs)
        for i, p in enumerate(space.tensors):
            manual = sum(c * space.dense(noise, i, 3, d) for d, c in coeffs)
            assert torch.allclose(p.grad, manual, atol=1e-5)
        before = [p.detach().clone() for p in space.tensors]
        grads = [p.grad.clone() for p in space.tensors]
        accumulate(space, noise, 3, coeffs, lr=0.1, into="update")
        for b, g, p in zip(before, grads, space.tensors):
            assert torch.allclose(p, b - 0.1 * g, atol=1e-5)


def _quadratic(dim: int = 6):
    a = torch.linspace(0.5, 3.0, dim)
    center = torch.linspace(-1, 1, dim)
    theta = torch.zeros(dim, requires_grad=True)

    def f() -> torch.Tensor:
        with torch.no_grad():
            return 0.5 * (a * (theta - center) ** 2).sum()

    true_grad = a * (theta.detach() - center)  # the Gaussian-smoothed gradient of a quadratic is exact
    return theta, f, true_grad


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "gaussian-table"])
def test_spsa_estimate_unbiased_on_quadratic(distribution: str):
    """Two-sided SPSA: g = (f(t + s z) - f(t - s z)) / (2 s) * z, E[g] = grad f for E[z z^T] = I."""
    theta, f, true_grad = _quadratic()
    space, noise = ParamSpace([theta]), SeededNoise(123, distribution)
    perturb = InPlacePerturbation(space, noise)
    perturb.discover(f)
    sigma, n = 0.1, 3000
    samples = []
    for k in range(n):
        with perturb.apply(k, 0, sigma):
            plus = float(f())
        with perturb.apply(k, 0, -sigma):
            minus = float(f())
        accumulate(space, noise, k, [(0, (plus - minus) / (2 * sigma))])
        samples.append(theta.grad.clone())
    est = torch.stack(samples)
    mean, std = est.mean(0), est.std(0)
    tol = 4 * std / math.sqrt(n)
    assert ((mean - true_grad).abs() <= tol).all(), (mean, true_grad, tol)
    # a sign or factor-2 error lies far outside the tolerance
    assert ((-mean - true_grad).abs() > tol).any() and ((2 * mean - true_grad).abs() > tol).any()


def test_es_population_estimate_unbiased_on_quadratic():
    """OpenAI-ES with raw fitness: g = 1/(P sigma) sum_m F_m s_m eps_m over mirrored members."""
    theta, f, true_grad = _quadratic()
    space, noise = ParamSpace([theta]), SeededNoise(7)
    perturb = InPlacePerturbation(space, noise)
    perturb.discover(f)
    sigma, pop, gens = 0.2, 20, 400
    samples = []
    for g in range(gens):
        coeffs: dict[int, float] = {}
        for d, scale in member_directions(range(pop), sigma):
            with perturb.apply(g, d, scale):
                loss = float(f())
            coeffs[d] = coeffs.get(d, 0.0) + loss * scale / (pop * sigma**2)
        accumulate(space, noise, g, list(coeffs.items()))
        samples.append(theta.grad.clone())
    est = torch.stack(samples)
    tol = 4 * est.std(0) / math.sqrt(gens)
    assert ((est.mean(0) - true_grad).abs() <= tol).all()
    assert ((est.mean(0) + true_grad).abs() > tol).any()


# ---------------------------------------------------------------- shaping
def test_shaping_definitions():
    x = torch.tensor([3.0, 1.0, 2.0, 10.0])
    assert torch.allclose(centered_ranks(x), torch.tensor([1 / 6, -0.5, -1 / 6, 0.5], dtype=torch.float64))
    assert torch.allclose(
        centered_ranks(torch.tensor([1.0, 1.0, 2.0])), torch.tensor([-0.25, -0.25, 0.5], dtype=torch.float64)
    )
    z = zscore(x)
    assert torch.allclose(z, (x.double() - x.double().mean()) / x.double().std(unbiased=False))
    assert torch.equal(shape(x, "raw")[0], x.double())
    with pytest.raises(ValueError, match="shaping"):
        shape(x, "softmax")


def test_nonfinite_fitness_ranked_worst_and_counted():
    clean, bad = sanitize(torch.tensor([1.0, float("nan"), 0.5, float("inf")]))
    assert bad == 2 and torch.isfinite(clean).all() and clean[1] > 1.0 and clean[3] > 1.0
    u, bad = shape(torch.tensor([1.0, float("nan"), 0.5, -float("inf")]))
    assert bad == 2 and u[1] >= u[0] and u[3] >= u[0]
    with pytest.raises(NonFiniteFitnessError, match="unchanged"):
        shape(torch.tensor([float("nan"), float("inf")]))


def test_param_space_validation():
    with pytest.raises(ValueError, match="requires_grad"):
        ParamSpace([torch.zeros(3)])
    with pytest.raises(ValueError, match="rank"):
        ParamSpace(nn.Linear(2, 2), rank=-1)
    frozen = nn.Linear(3, 3)
    frozen.weight.requires_grad_(False)
    assert ParamSpace(frozen).names == ["bias"]
