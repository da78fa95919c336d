"""Deep GA (seed-chain genomes) and the module adapter for flat ask/tell strategies."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nograd.core.shaping import NonFiniteFitnessError
from nograd.strategies.functions import sphere
from nograd.strategies.ga import GA
from nograd.strategies.module_adapter import ModuleAdapter

pytestmark = pytest.mark.usefixtures("one_thread")


def mse_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean(1)


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))


def test_ga_genomes_rebuild_members_bit_identically():
    ga = GA(torch.linspace(-1, 1, 20), sigma=0.05, popsize=12, seed=3, truncation=4)
    for _ in range(8):
        pop = ga.ask()
        for i in range(ga.popsize):
            assert torch.equal(ga.genome_to_params(ga.genome(i)), pop[i])
        ga.tell(sphere(pop))
    assert len(ga.elite) >= 1 and len(ga.parents) == 4
    assert torch.equal(ga.genome_to_params(ga.elite), ga.mean)


@pytest.mark.parametrize("noise", ["gaussian-table", "gaussian-counter"])
def test_ga_mutations_from_the_shared_table_or_the_counter_rebuild_bit_identically(noise):
    from nograd.core.noise import SeededNoise

    ga = GA(torch.linspace(-1, 1, 20), sigma=0.05, popsize=8, seed=3, noise=noise)
    seed = ga.genome(1)[-1]
    # the table: the run's one table, at an offset keyed by the mutation's seed; the counter: keyed by it
    source, member = (
        (SeededNoise(3, noise), seed) if noise == "gaussian-table" else (SeededNoise(seed, noise), 0)
    )
    expected = source.fill_(torch.empty(20), generation=0, member=member, index=0)
    assert torch.equal(ga.mutation(seed), expected.double())
    for _ in range(3):
        pop = ga.ask()
        assert all(torch.equal(ga.genome_to_params(ga.genome(i)), pop[i]) for i in range(ga.popsize))
        ga.tell(sphere(pop))


def test_ga_elitism_and_truncation_selection():
    ga = GA(torch.ones(10), sigma=0.1, popsize=20, seed=0, truncation=5)
    best = []
    for _ in range(30):
        pop = ga.ask()
        losses = sphere(pop)
        if ga.generation > 0:  # member 0 is last generation's best, unmutated
            assert torch.equal(pop[0], ga.mean)
        ga.tell(losses)
        best.append(float(losses.min()))
        assert torch.equal(ga.mean, pop[int(torch.argmin(losses))])
    assert all(b1 <= b0 + 1e-12 for b0, b1 in zip(best, best[1:]))  # deterministic loss + elitism
    assert best[-1] < 0.5 * best[0]


def test_ga_state_dict_round_trip():
    ga = GA(torch.ones(6), sigma=0.1, popsize=10, seed=1)
    for _ in range(5):
        ga.tell(sphere(ga.ask()))
    state = copy.deepcopy(ga.state_dict())
    for _ in range(3):
        ga.tell(sphere(ga.ask()))
    other = GA(torch.zeros(6), sigma=0.1, popsize=10, seed=1)
    other.load_state_dict(state)
    for _ in range(3):
        other.tell(sphere(other.ask()))
    assert torch.equal(other.ask(), ga.ask())
    assert torch.equal(other.mean, ga.mean)


@pytest.mark.parametrize("kw", [{"truncation": 0}, {"truncation": 11}, {"sigma": 0.0}, {"popsize": 1}])
def test_ga_bad_hyperparameters(kw):
    args = {"sigma": 0.1, "popsize": 10, **kw}
    with pytest.raises(ValueError):
        GA(torch.ones(4), args.pop("sigma"), args.pop("popsize"), 0, **args)


def test_ga_on_a_module_evaluates_its_genomes_bit_identically():
    model = small_net()
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    seen = []

    def loss_fn(m, x, y):
        seen.append(torch.cat([p.detach().flatten().clone() for p in m.parameters()]))
        return mse_rows(m, x, y)

    trainer = ModuleAdapter(model, "ga", sigma=0.05, popsize=8, seed=2, mode="loop", truncation=3)
    for _ in range(4):
        seen.clear()
        chains = [trainer.strategy.genome(i) for i in range(8)]
        trainer.step(loss_fn, x, y)
        for chain, params in zip(chains, seen):
            rebuilt = trainer.strategy.genome_to_params(chain).to(torch.float32)
            assert torch.equal(rebuilt, params)
    assert torch.equal(trainer.vector(), trainer.strategy.mean.float().double())


@pytest.mark.parametrize("name", ["sep-cma", "snes", "cem", "pgpe", "lm-ma-es", "rm-es", "ga"])
def test_adapter_modes_agree(name):
    """Members one by one, vmapped chunks, and the whole population batched: the same losses."""
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    losses = {}
    for mode in ("vmap", "loop", "batched"):
        model = small_net(1)
        trainer = ModuleAdapter(model, name, sigma=0.1, popsize=8, seed=0, mode=mode, chunk_size=3)
        losses[mode] = torch.stack([trainer.step(mse_rows, x, y) for _ in range(3)])
    torch.testing.assert_close(losses["vmap"], losses["loop"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["batched"], losses["loop"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sep-cma", "snes", "cem", "pgpe", "lm-ma-es", "rm-es"])
def test_float32_samples_follow_the_float64_equations(name):
    """The adapter draws float32 samples for float32 weights; the state stays float64 and the
    trajectory matches the all-float64 strategy to float32 rounding."""
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        trainer = ModuleAdapter(small_net(1), name, sigma=0.1, popsize=8, seed=0, mode="loop")
        trainer.strategy.sample_dtype = dtype
        if name == "lm-ma-es":  # its default follows the dtype; both sides draw d directly here
            trainer.strategy.sampling = "direct"
        for _ in range(4):
            trainer.step(mse_rows, x, y)
        runs[dtype] = trainer.strategy
    fast, exact = runs[torch.float32], runs[torch.float64]
    assert fast.mean.dtype == torch.float64 and fast.best_x.dtype == torch.float64
    torch.testing.assert_close(fast.mean, exact.mean, rtol=1e-4, atol=1e-5)
    assert fast.sigma == pytest.approx(exact.sigma, rel=1e-4)


def test_adapter_batched_on_a_gpt_and_a_layer_without_a_batched_rule():
    """Attention, layer norms, tied embeddings (the char GPT) and a Conv1d (run per member with
    its own weights): batched losses equal the loop's."""
    from nograd.models.gpt import GPT, GPTConfig
    from nograd.tasks.shakespeare import per_example_loss

    ids = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(0))

    def gpt() -> nn.Module:
        return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))

    def conv() -> nn.Module:
        return nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4, 2))

    cases = [
        (gpt, (ids, (ids + 1) % 11), per_example_loss),
        (conv, (torch.randn(5, 2, 6), torch.randn(5, 2)), mse_rows),
    ]
    for make, args, loss in cases:
        losses = {}
        for mode in ("loop", "batched"):
            torch.manual_seed(0)
            trainer = ModuleAdapter(make(), "snes", sigma=0.05, popsize=6, seed=1, mode=mode)
            losses[mode] = torch.stack([trainer.step(loss, *args) for _ in range(2)])
        torch.testing.assert_close(losses["batched"], losses["loop"], rtol=1e-5, atol=1e-6)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.emb(ids)))


def ce_rows(model, ids, targets):
    logits = model(ids)
    return (
        nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        .view(ids.shape)
        .mean(1)
    )


def test_adapter_handles_tied_weights_and_trains():
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (8, 5))
    targets = (ids + 1) % 7
    model = Tied()
    trainer = ModuleAdapter(model, "sep-cma", sigma=0.2, popsize=16, seed=0, mode="vmap")
    assert trainer.dim == 7 * 4 + 4 + 4  # the tied matrix once
    with torch.no_grad():
        start = float(ce_rows(model, ids, targets).mean())
    loop = ModuleAdapter(copy.deepcopy(model), "sep-cma", sigma=0.2, popsize=16, seed=0, mode="loop")
    batched = ModuleAdapter(copy.deepcopy(model), "sep-cma", sigma=0.2, popsize=16, seed=0, mode="batched")
    torch.testing.assert_close(trainer.evaluate(ce_rows, ids, targets), loop.evaluate(ce_rows, ids, targets))
    torch.testing.assert_close(batched.evaluate(ce_rows, ids, targets), loop.evaluate(ce_rows, ids, targets))
    for _ in range(60):
        trainer.step(ce_rows, ids, targets)
    with torch.no_grad():
        end = float(ce_rows(model, ids, targets).mean())
    assert model.head.weight is model.emb.weight
    assert end < start - 0.5, (start, end)


def test_adapter_state_dict_round_trip():
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    model = small_net(2)
    trainer = ModuleAdapter(model, "lm-ma-es", sigma=0.1, popsize=8, seed=4)
    for _ in range(3):
        trainer.step(mse_rows, x, y)
    state = copy.deepcopy(trainer.state_dict())
    for _ in range(3):
        trainer.step(mse_rows, x, y)
    other = small_net(5)
    trainer2 = ModuleAdapter(other, "lm-ma-es", sigma=0.1, popsize=8, seed=4)
    trainer2.load_state_dict(state)
    for _ in range(3):
        trainer2.step(mse_rows, x, y)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_adapter_nonfinite_losses():
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    model = small_net(3)
    trainer = ModuleAdapter(model, "snes", sigma=0.1, popsize=8, seed=0, mode="loop")
    calls = [0]

    def some_nan(m, x, y):
        calls[0] += 1
        out = mse_rows(m, x, y)
        return out * float("nan") if calls[0] % 3 == 0 else out

    trainer.step(some_nan, x, y)
    assert trainer.last_info["nonfinite"] == 2
    before = trainer.vector()
    state = copy.deepcopy(trainer.strategy.state_dict())
    with pytest.raises(NonFiniteFitnessError):
        trainer.step(lambda m, x, y: mse_rows(m, x, y) * float("nan"), x, y)
    assert torch.equal(trainer.vector(), before)
    assert torch.equal(trainer.strategy.state_dict()["mean"], state["mean"])


def test_adapter_bad_arguments():
    with pytest.raises(ValueError):
        ModuleAdapter(small_net(), "nope", sigma=0.1)
    with pytest.raises(ValueError):
        ModuleAdapter(small_net(), "snes", sigma=0.1, mode="gpu")
    with pytest.raises(ValueError):
        ModuleAdapter(small_net(), "snes")
    with pytest.raises(ValueError):
        ModuleAdapter(small_net(), GA(torch.ones(3), 0.1, 4))


def test_adapter_auto_mode_is_batched_while_the_population_fits():
    assert ModuleAdapter(small_net(), "snes", sigma=0.1).mode == "batched"
    assert ModuleAdapter(small_net(), "snes", sigma=0.1, batched_bytes=16).mode == "loop"  # on CPU
