"""Shared ask/tell API of nograd.strategies: validation, laziness, NaN handling, checkpoints."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nograd.core.noise import SeededNoise
from nograd.core.shaping import NonFiniteFitnessError
from nograd.strategies import ASK_TELL, CEM, CMAES, LMMAES, PGPE, SNES, RmES, SepCMAES, Strategy
from nograd.strategies.functions import (
    FUNCTIONS,
    ellipsoid,
    optimum,
    rosenbrock,
    rotation_blocks,
    separable_ellipsoid,
    sphere,
)

# the flat-vector strategies of this module (others may register more in ASK_TELL)
ALL = ["cem", "cma", "lm-ma-es", "pgpe", "rm-es", "sep-cma", "snes"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # small tensors: one intra-op thread avoids oversubscription on a shared 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make(name: str, dim: int = 12, seed: int = 3, **kw) -> Strategy:
    return ASK_TELL[name](torch.linspace(-1, 1, dim, dtype=torch.float64), 0.4, seed=seed, **kw)


def run(es: Strategy, gens: int, f=ellipsoid) -> None:
    for _ in range(gens):
        es.tell(f(es.ask()))


def test_registry() -> None:
    expected = {
        "cma": CMAES,
        "sep-cma": SepCMAES,
        "lm-ma-es": LMMAES,
        "rm-es": RmES,
        "snes": SNES,
        "pgpe": PGPE,
        "cem": CEM,
    }
    assert {k: ASK_TELL[k] for k in expected} == expected and sorted(expected) == ALL
    for name, cls in expected.items():
        assert cls.name == name and issubclass(cls, Strategy)


@pytest.mark.parametrize("name", ALL)
def test_ask_member_shapes_and_determinism(name: str) -> None:
    es = make(name)
    X = es.ask()
    assert X.shape == (es.popsize, 12) and X.dtype == torch.float64
    assert es.mean.dtype == torch.float64 and es.mean.shape == (12,)
    assert torch.equal(es.ask(), X)  # asking twice gives the same population
    for i in (0, es.popsize - 1):
        assert torch.allclose(es.member(i), X[i], rtol=0, atol=1e-14)
    with pytest.raises(IndexError):
        es.member(es.popsize)
    # same seed -> same population, other seed -> other population
    assert torch.equal(make(name).ask(), X)
    assert not torch.equal(make(name, seed=4).ask(), X)
    run(es, 2)
    assert es.generation == 2 and es.evaluations == 2 * es.popsize
    assert not torch.equal(es.ask(), X)


@pytest.mark.parametrize("name", ALL)
def test_samples_are_regenerated_from_seeded_noise(name: str) -> None:
    es = make(name, seed=11)
    run(es, 2)
    z = es.standard_normal([0, 1])
    noise = SeededNoise(11)
    for row, m in enumerate([0, 1]):
        ref = noise.full((12,), generation=2, member=m, index=0, dtype=torch.float64)
        assert torch.equal(z[row], ref)


@pytest.mark.parametrize("name", ALL)
def test_lazy_population_matches_cached(name: str) -> None:
    """Without the cache (regenerating in small chunks) the run is the same up to rounding."""
    a = make(name, dim=16)
    b = make(name, dim=16)
    b.cache_elements = 0
    b.chunk_elements = 3 * 16  # regenerate three members at a time
    for _ in range(6):
        Xa, Xb = a.ask(), b.ask()
        assert torch.allclose(Xa, Xb, rtol=1e-12, atol=1e-12)
        f = rosenbrock(Xa)
        a.tell(f)
        b.tell(f)
    assert b._cache is None or name == "cma"
    assert torch.allclose(a.mean, b.mean, rtol=1e-12, atol=1e-12)
    assert math.isclose(a.sigma, b.sigma, rel_tol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_validation(name: str) -> None:
    cls = ASK_TELL[name]
    with pytest.raises(ValueError, match="sigma"):
        cls([0.0, 1.0], 0.0)
    with pytest.raises(ValueError, match="sigma"):
        cls([0.0, 1.0], -1.0)
    with pytest.raises(ValueError, match="sigma"):
        cls([0.0, 1.0], float("nan"))
    with pytest.raises(ValueError, match="popsize"):
        cls([0.0, 1.0], 1.0, popsize=1)
    with pytest.raises(ValueError, match="x0"):
        cls(torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="x0"):
        cls([], 1.0)
    with pytest.raises(ValueError, match="x0"):
        cls([0.0, float("inf")], 1.0)
    with pytest.raises(TypeError, match="unknown|unexpected"):
        cls([0.0, 1.0], 1.0, not_a_parameter=3)
    es = make(name)
    for bad in (torch.zeros(es.popsize - 1), torch.zeros(es.popsize + 1), torch.zeros(es.popsize, 1)):
        with pytest.raises(ValueError, match=f"expects {es.popsize} losses"):
            es.tell(bad)
    assert es.generation == 0


def test_strategy_specific_validation() -> None:
    with pytest.raises(ValueError, match="even"):
        PGPE([0.0] * 4, 1.0, popsize=5)
    assert PGPE([0.0] * 10, 1.0).popsize % 2 == 0
    with pytest.raises(ValueError, match="max_dim"):
        CMAES(torch.zeros(2001), 1.0)
    assert CMAES(torch.zeros(30), 1.0, max_dim=20000).dim == 30
    with pytest.raises(ValueError, match="elite_frac"):
        CEM([0.0] * 4, 1.0, popsize=4, elite_frac=1.0)
    with pytest.raises(ValueError, match="smoothing"):
        CEM([0.0] * 4, 1.0, smoothing=0.0)
    with pytest.raises(ValueError, match="c_1"):
        CMAES([0.0] * 4, 1.0, c_1=0.8, c_mu=0.5)
    with pytest.raises(ValueError, match="momentum"):
        PGPE([0.0] * 4, 1.0, momentum=1.0)
    with pytest.raises(ValueError, match="paths"):
        RmES([0.0] * 4, 1.0, paths=0)
    with pytest.raises(ValueError, match="memory"):
        LMMAES([0.0] * 4, 1.0, memory=-1)


@pytest.mark.parametrize("name", ALL)
def test_nan_losses_are_ranked_worst(name: str) -> None:
    es = make(name)
    run(es, 2)
    X = es.ask()
    f = ellipsoid(X)
    best = int(torch.argmin(f))
    f[best] = float("nan")  # the would-be best member is now the worst
    f[(best + 1) % es.popsize] = float("inf")
    es.tell(f)
    assert es.nonfinite == 2 and es.generation == 3
    for key, value in es.state_dict().items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all(), key
    assert math.isfinite(es.sigma) and es.sigma > 0
    assert math.isfinite(es.best_f)
    # the NaN member must not be remembered as best
    assert es.best_f <= float(f[torch.isfinite(f)].min())


@pytest.mark.parametrize("name", ALL)
def test_all_nan_generation_raises_and_leaves_state(name: str) -> None:
    es = make(name)
    run(es, 2)
    before = es.state_dict()
    X = es.ask()
    with pytest.raises(NonFiniteFitnessError):
        es.tell(torch.full((es.popsize,), float("nan")))
    with pytest.raises(NonFiniteFitnessError):
        es.tell(
            torch.tensor(
                [float("inf"), float("-inf")] * (es.popsize // 2) + [float("nan")] * (es.popsize % 2)
            )
        )
    after = es.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        if isinstance(before[key], torch.Tensor):
            assert torch.equal(before[key], after[key]), key
        else:
            assert before[key] == after[key], key
    assert torch.equal(es.ask(), X)
    assert es.nonfinite == 0 and es.evaluations == 2 * es.popsize


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(name: str) -> None:
    es = make(name, dim=14, seed=5)
    run(es, 4)
    buf = io.BytesIO()
    torch.save(es.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = make(name, dim=14, seed=99)  # the seed comes back from the checkpoint
    fresh.load_state_dict(state)
    assert torch.equal(fresh.ask(), es.ask())  # bit-identical next population
    for _ in range(4):
        Xa, Xb = es.ask(), fresh.ask()
        assert torch.equal(Xa, Xb)
        f = ellipsoid(Xa)
        es.tell(f)
        fresh.tell(f)
    assert torch.equal(es.mean, fresh.mean)
    assert es.sigma == fresh.sigma and es.generation == fresh.generation == 8
    assert es.best_f == fresh.best_f and torch.equal(es.best_x, fresh.best_x)
    # a state from a different problem is refused clearly
    with pytest.raises(ValueError, match="dim"):
        make(name, dim=15).load_state_dict(state)
    other = "cma" if name != "cma" else "snes"
    with pytest.raises(ValueError, match="strategy"):
        make(other, dim=14).load_state_dict(state)


@pytest.mark.parametrize("name", ALL)
def test_table_noise_samples_save_and_solve(name: str) -> None:
    es = make(name, seed=11, noise="gaussian-table")
    run(es, 2)
    ref = SeededNoise(11, "gaussian-table").full((12,), generation=2, member=1, index=0, dtype=torch.float64)
    assert torch.equal(es.standard_normal([1])[0], ref)
    # the noise kind is saved and comes back with the state
    fresh = make(name, seed=11)
    fresh.load_state_dict(es.state_dict())
    assert fresh.noise_kind == "gaussian-table" and torch.equal(fresh.ask(), es.ask())
    # and the strategy still optimises with it
    kw = {"popsize": 20} if name == "cem" else {}
    start = float(sphere(torch.linspace(-1, 1, 6, dtype=torch.float64)))
    _, f = make(name, dim=6, noise="gaussian-table", **kw).optimize(sphere, max_evals=60 * 20)
    assert f < 0.1 * start  # CEM and PGPE are slow here with Gaussian noise too (0.02, 0.001)
    with pytest.raises(ValueError, match="noise"):
        make(name, noise="rademacher")


@pytest.mark.parametrize("name", ["sep-cma", "snes", "pgpe", "cem", "rm-es", "lm-ma-es"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_table_noise_is_read_in_place_with_the_numbers_of_drawn_copies(name, dtype, monkeypatch):
    """With the shared table, each candidate is written straight from its slices of the table and
    tell sums them where they lie: no population-sized draw and no cache. The candidates have the
    bits of the same strategy computing them from drawn copies of those numbers, and its updates
    agree to float rounding (the sums run in another order)."""
    from nograd.core.noise import SMALL

    dim = SMALL * 4 + 3  # block-keyed noise (group draws cover small tensors)
    big_draws = []
    real_draw = SeededNoise._draw

    def counting_draw(self, out, key, generator=None):
        if out.numel() > SMALL:
            big_draws.append(out.numel())
        return real_draw(self, out, key, generator)

    def build(in_place: bool) -> Strategy:
        es = ASK_TELL[name](
            torch.linspace(-1, 1, dim, dtype=torch.float64), 0.3, 8, 5, noise="gaussian-table"
        )
        es.sample_dtype = dtype
        es.table_in_place = in_place
        return es

    es, copies = build(True), build(False)
    reads_in_place = name != "lm-ma-es" or dtype == torch.float32  # LM-MA-ES's paper stream keeps z
    assert es._reads_table_in_place() == reads_in_place and not copies._reads_table_in_place()
    es.noise.table()  # made once per seed (by draws), then only read
    monkeypatch.setattr(SeededNoise, "_draw", counting_draw)
    for _ in range(3):
        big_draws.clear()
        X = es.ask()
        f = ellipsoid(X.double())
        es.tell(f)
        if reads_in_place:
            assert big_draws == [] and es._cached() is None
        big_draws.clear()
        Y = copies.ask()
        assert torch.equal(X, Y)
        copies.tell(f)
        assert big_draws  # the oracle does draw its copies
        torch.testing.assert_close(es.mean, copies.mean, rtol=1e-6, atol=1e-6)
        assert es.sigma == pytest.approx(copies.sigma, rel=1e-6)
        copies.load_state_dict(es.state_dict())  # keep the two on one path


@pytest.mark.parametrize("noise", ["gaussian", "gaussian-table"])
def test_lm_ma_es_direct_sampling_resumes_bit_for_bit(noise: str) -> None:
    """Float32 samples draw d directly; the next generation's factor is built in tell's pass over M,
    and a resumed copy, which builds it in ask, gets the same bits. The choice is saved."""

    def make_direct(seed: int) -> LMMAES:
        es = LMMAES(torch.linspace(-1, 1, 300, dtype=torch.float64), 0.3, seed=seed, noise=noise)
        es.sample_dtype = torch.float32
        return es

    es = make_direct(6)
    assert es.direct_sampling()
    for _ in range(es.memory + 2):
        es.tell(ellipsoid(es.ask().double()))
    buf = io.BytesIO()
    torch.save(es.state_dict(), buf)
    buf.seek(0)
    fresh = make_direct(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):
        Xa, Xb = es.ask(), fresh.ask()
        assert torch.equal(Xa, Xb)
        es.tell(ellipsoid(Xa.double()))
        fresh.tell(ellipsoid(Xb.double()))
    assert torch.equal(es.M, fresh.M) and torch.equal(es.gram, fresh.gram) and es.sigma == fresh.sigma
    # a state saved before the option (no gram, no sampling) resumes with the paper's stream
    old = es.state_dict()
    del old["gram"], old["sampling"]
    paper = make_direct(0)
    paper.load_state_dict(old)
    assert paper.sampling == "paper" and not paper.direct_sampling()
    torch.testing.assert_close(paper.gram, es.M @ es.M.T)
    with pytest.raises(ValueError, match="sampling"):
        LMMAES([0.0] * 4, 1.0, sampling="fast")
    with pytest.raises(ValueError, match="sampling"):
        make_direct(0).load_state_dict({**es.state_dict(), "sampling": "fast"})


def test_state_dict_of_fresh_object_loads() -> None:
    es = CMAES([1.0, 2.0, 3.0], 0.5)
    buf = io.BytesIO()
    torch.save(es.state_dict(), buf)
    buf.seek(0)
    other = CMAES([0.0, 0.0, 0.0], 0.1)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.ask(), es.ask()) and other.best_x is None and other.best_f == math.inf


@pytest.mark.parametrize("name", ALL)
def test_optimize_tracks_best_and_respects_budget(name: str) -> None:
    es = make(name, dim=6)
    kw = {"popsize": 20} if name == "cem" else {}
    es = make(name, dim=6, **kw)
    x, f = es.optimize(sphere, max_evals=40 * es.popsize + 3)
    assert es.evaluations <= 40 * es.popsize + 3
    assert math.isclose(float(sphere(x)), f, rel_tol=1e-12)
    assert f == es.best_f and f < float(sphere(torch.linspace(-1, 1, 6, dtype=torch.float64)))
    # non-vectorized objective: candidates rebuilt one at a time from seeds
    es2 = make(name, dim=6, **kw)
    x2, f2 = es2.optimize(lambda v: float(sphere(v)), max_evals=10 * es2.popsize, vectorized=False)
    es3 = make(name, dim=6, **kw)
    x3, f3 = es3.optimize(sphere, max_evals=10 * es3.popsize)
    assert math.isclose(f2, f3, rel_tol=1e-12) and torch.allclose(x2, x3, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="max_evals"):
        make(name).optimize(sphere, max_evals=1)


def test_optimize_target_and_stop() -> None:
    es = CMAES([1.0] * 4, 0.5, seed=0)
    x, f = es.optimize(sphere, max_evals=100000, target=1e-5)
    assert f <= 1e-5 and es.evaluations < 2000
    # a flat objective triggers the tolfun criterion long before the budget
    es = CMAES([1.0] * 4, 0.5, seed=0)
    es.optimize(lambda X: torch.zeros(X.shape[0]), max_evals=100000)
    assert "tolfun" in es.stop() and es.evaluations < 2000
    # convergence: tolfun fires first (the tutorial's 1e-12), without it tolx (1e-12 sigma0)
    es = CMAES([1.0] * 3, 1.0, seed=0)
    es.optimize(sphere, max_evals=200000)
    assert "tolfun" in es.stop() and es.best_f < 1e-10
    es = CMAES([1.0] * 3, 1.0, seed=0)
    es.tolfun = 0.0
    es.optimize(sphere, max_evals=200000)
    assert "tolx" in es.stop() and es._max_std() < 1e-12 and es.evaluations < 200000


def test_functions_optima_and_shapes() -> None:
    for name, fn in FUNCTIONS.items():
        for dim in (2, 7, 45):
            xs, fs = optimum(name, dim)
            assert abs(float(fn(xs)) - fs) < 1e-12, name
            X = torch.randn(5, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(dim))
            batch = fn(X)
            assert batch.shape == (5,)
            assert torch.allclose(batch, torch.stack([fn(x) for x in X]), rtol=1e-12), name
            assert (batch > fs).all(), name
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert float(separable_ellipsoid(x)) == pytest.approx(1 + 1e3 * 4 + 1e6 * 9)
    assert float(rosenbrock(torch.zeros(3, dtype=torch.float64))) == 2.0
    for n in (5, 40, 100):  # the rotation is orthogonal and the rotated ellipsoid is f_elli(R x)
        R = rotation_blocks(n)
        assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
        X = torch.randn(3, n, dtype=torch.float64)
        assert torch.allclose(ellipsoid(X), separable_ellipsoid(X @ R.T), rtol=1e-12)
    with pytest.raises(ValueError):
        optimum("nope", 3)
    with pytest.raises(ValueError):
        sphere(torch.zeros(2, 2, 2))


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=8, deadline=None)
@given(
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-1e3, 1e3),
    power=st.sampled_from([1.0, 0.5, 3.0]),
)
def test_invariant_to_increasing_transformations_of_the_loss(name: str, scale, shift, power) -> None:
    """Every strategy here is rank-based: a strictly increasing g(f) gives the very same run."""
    a, b = make(name, dim=8), make(name, dim=8)
    for _ in range(4):
        f = sphere(a.ask())
        a.tell(f)
        b.tell(scale * f**power + shift)
    assert torch.equal(a.mean, b.mean) and a.sigma == b.sigma
