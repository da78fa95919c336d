"""Seconds per ES generation relative to plain batched inference (``nograd bench es --json``).

Model: an MLP ``64 -> h -> h -> 64`` (ReLU) with ``h`` chosen so it has about ``--dim``
parameters (h = 256: 98,880 for the default 1e5). Every strategy runs whole generations
(sample, evaluate ``--population`` members on the same ``--batch`` rows, update) and is timed
against the reference: inference of ``population`` different copies of the MLP on those rows in
one pass, ``baddbmm`` over stacked weights ``(P, in, out)``. Strategy and reference calls are
interleaved and repeated, and the ratio is ``median(strategy) / median(reference)``.

* ``eggroll`` (rank 1) and ``openai-es`` (dense noise) use the batched engine and step an Adam.
* the flat ask/tell strategies go through the module adapter (``--adapter-mode``: ``auto`` =
  the whole population in one batched forward over the members' own weights while it fits;
  ``loop`` = members one by one); ``ga`` is the Deep GA.
* LM-MA-ES is first run until its ``m`` memory vectors are all in use (``generations_before_timing``):
  earlier generations use fewer of them and cost less. Its entries also give ``sampling`` and, when
  it draws ``d`` directly, ``directions``: the rows ``r`` of its covariance factor (one ``P x r x d``
  product per generation; see :mod:`nograd.strategies.lm_ma_es`).
* full ``cma`` is skipped: it stores a dim x dim covariance (8e10 bytes at dim 1e5).
* ``--table`` adds each dense strategy again with ``noise="gaussian-table"``, reported as
  ``"NAME (gaussian-table)"`` (its candidates are written from the table's slices where they lie,
  and its update sums them in place: no samples are drawn); ``--counter`` likewise with
  ``noise="gaussian-counter"`` (the compiled counter-based Gaussian; its kernel is compiled in the
  untimed first generation).

Next to the ratios: ``floor_ratio``, the physical floor of a dense strategy (the reference, which
reads the ``P x d`` weights once, plus one write of the ``P x d`` float32 population), and
``draw_ratio``, the time to draw the ``P x d`` numbers with each noise kind, in reference passes
(a strategy that draws fresh Gaussians cannot go below ``floor_ratio + draw_ratio``). The
figures measured so far are in BENCHMARKS.md ("Evolution strategies' speed").

Example:
    >>> out = run(["--dim", "2000", "--population", "8", "--repeats", "1", "--strategies", "eggroll"])
    >>> sorted(out["strategies"])
    ['eggroll']
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import torch
from torch import nn

from nograd.bench import BenchArgumentParser
from nograd.bench.timing import interleaved_medians
from nograd.core.noise import SeededNoise
from nograd.strategies.eggroll import EGGROLL
from nograd.strategies.lm_ma_es import LMMAES
from nograd.strategies.module_adapter import ModuleAdapter
from nograd.strategies.openai_es import OpenAIES

ADAPTER_STRATEGIES = ("sep-cma", "lm-ma-es", "rm-es", "snes", "pgpe", "cem", "ga")
ALL = ("eggroll", "openai-es", *ADAPTER_STRATEGIES, "cma")
SKIPPED = {
    "cma": "full CMA-ES keeps a dim x dim covariance and eigendecomposition: not applicable at this dim"
}
IN_OUT = 64


def hidden_for(dim: int) -> int:
    """``h`` with ``h^2 + (2 * 64 + 2) h + 64`` closest to ``dim`` (at least 4)."""
    b = 2 * IN_OUT + 2
    return max(4, round((-b + math.sqrt(b * b + 4 * max(0, dim - IN_OUT))) / 2))


def make_mlp(h: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN_OUT, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, IN_OUT))


def mse_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean(1)


def stacked_reference(
    model: nn.Sequential, population: int, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    """One pass of ``population`` distinct MLPs over the same rows (weights stacked, bmm)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    ws = [
        (lin.weight.detach().T.unsqueeze(0) + 0.01 * torch.randn(population, *lin.weight.T.shape))
        for lin in linears
    ]
    bs = [
        (lin.bias.detach() + 0.01 * torch.randn(population, lin.bias.numel())).unsqueeze(1) for lin in linears
    ]
    xs = x.unsqueeze(0).expand(population, *x.shape)

    def call() -> None:
        with torch.no_grad():
            h = xs
            for i, (w, b) in enumerate(zip(ws, bs)):
                h = torch.baddbmm(b, h, w)
                if i < len(ws) - 1:
                    h = torch.relu(h)
            ((h - y) ** 2).mean(2).mean(1)

    return call


def population_passes(population: int, dim: int, noises: tuple[str, ...], repeats: int) -> dict[str, float]:
    """Median seconds of one write of a ``population x dim`` float32 matrix (``"write"``, memory
    kept between) and of drawing that many numbers with each noise kind (by its name)."""
    buf = torch.empty(population, dim)
    gens = {n: SeededNoise(0, n) for n in noises}
    count = [0]

    def draw(noise: str) -> None:
        count[0] += 1  # a fresh generation each time
        gens[noise].members((dim,), generation=count[0], members=range(population), index=0)

    timed = {"write": lambda: buf.fill_(1.0), **{n: (lambda n=n: draw(n)) for n in noises}}
    return interleaved_medians(timed, repeats=max(repeats, 3), warmup=1)


def steady_generations(strategy: object) -> int:
    """Generations to run before timing so that a generation costs what it will from then on.
    LM-MA-ES's generation ``t`` uses ``min(t, m)`` of its ``m`` memory vectors, so its cost grows
    for ``m`` generations (38 at the default dim); every other strategy's is fixed from the start."""
    return int(getattr(strategy, "memory", 0))


def _sampling_facts(strategy: object) -> dict:
    """LM-MA-ES's way of drawing its samples, and the size of its covariance factor when direct."""
    if not isinstance(strategy, LMMAES):
        return {}
    if not strategy.direct_sampling():
        return {"sampling": "paper", "memory_vectors": strategy.memory}
    return {
        "sampling": "direct",
        "memory_vectors": strategy.memory,
        "directions": int(strategy.covariance_factor()[1].shape[0]),
    }


def _label(name: str, noise: str) -> str:
    return name if noise == "gaussian" else f"{name} ({noise})"


def run(args: list[str]) -> dict:
    p = BenchArgumentParser(prog="nograd bench es", description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=100_000, help="approximate number of MLP parameters")
    p.add_argument("--population", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="rows per member (all members see the same rows)")
    p.add_argument("--repeats", type=int, default=5, help="timed generations per strategy (median)")
    p.add_argument("--generations", type=int, default=None, help="alias of --repeats")
    p.add_argument("--chunk", type=int, default=None, help="members per vmapped forward in the adapter")
    p.add_argument("--strategies", default=",".join(ALL), help="comma-separated subset of " + ",".join(ALL))
    p.add_argument("--adapter-mode", choices=("auto", "batched", "vmap", "loop"), default="auto")
    p.add_argument(
        "--loop",
        action="store_true",
        help="also time sep-cma members one by one (or batched, with --adapter-mode loop)",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="also time every dense strategy with the shared noise table (noise='gaussian-table')",
    )
    p.add_argument(
        "--counter",
        action="store_true",
        help="also time every dense strategy with counter-based Gaussians (noise='gaussian-counter')",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="(output is JSON in any case)")
    a = p.parse_args(args)
    if a.generations is not None:
        a.repeats = a.generations
    names = [s for s in a.strategies.split(",") if s]
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        raise SystemExit(f"unknown strategies {unknown} (known: {', '.join(ALL)})")
    if a.population < 2 or a.population % 2:
        raise SystemExit("--population must be an even number >= 2")
    if a.threads:
        torch.set_num_threads(a.threads)
    h = hidden_for(a.dim)
    base = make_mlp(h)
    dim = sum(q.numel() for q in base.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch, IN_OUT, generator=gen)
    y = torch.randn(a.batch, IN_OUT, generator=gen)

    noises = (
        ("gaussian",)
        + (("gaussian-table",) if a.table else ())
        + (("gaussian-counter",) if a.counter else ())
    )

    def module_es(cls: type, **kw) -> Callable[[], object]:
        """One generation of a batched-engine strategy on a fresh MLP, Adam on its estimate."""
        model = make_mlp(h)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        es = cls(model, sigma=0.05, population=a.population, seed=0, optimizer=opt, **kw)
        return lambda: es.step(mse_rows, x, y)

    fns: dict[str, Callable[[], object]] = {}
    warmed: dict[str, int] = {}  # generations run before timing, beyond the one warm-up call
    strategies: dict[str, object] = {}
    for name in names:
        if name in SKIPPED:
            continue
        if name == "eggroll":
            fns[name] = module_es(EGGROLL, rank=1)
        elif name == "openai-es":
            for noise in noises:
                fns[_label(name, noise)] = module_es(OpenAIES, noise=noise)
        else:
            for noise in noises:
                adapter = ModuleAdapter(
                    make_mlp(h),
                    name,
                    sigma=0.05,
                    popsize=a.population,
                    seed=0,
                    chunk_size=a.chunk,
                    mode=a.adapter_mode,
                    noise=noise,
                )
                label = _label(name, noise)
                strategies[label] = adapter.strategy
                warmed[label] = steady_generations(adapter.strategy)
                for _ in range(warmed[label]):
                    adapter.step(mse_rows, x, y)
                fns[label] = lambda ad=adapter: ad.step(mse_rows, x, y)
    if a.loop and "sep-cma" in names:
        model = make_mlp(h)
        other = "batched" if a.adapter_mode == "loop" else "loop"
        adapter = ModuleAdapter(model, "sep-cma", sigma=0.05, popsize=a.population, seed=0, mode=other)
        fns[f"sep-cma ({other})"] = lambda ad=adapter: ad.step(mse_rows, x, y)

    # the reference runs before every strategy, so each ratio compares neighbouring calls
    timed: dict[str, Callable[[], object]] = {}
    ref = stacked_reference(base, a.population, x, y)
    for i, (name, fn) in enumerate(fns.items()):
        timed[f"ref{i}"] = ref
        timed[name] = fn
    med = interleaved_medians(timed, repeats=a.repeats, warmup=1)
    ref_s = sorted(v for k, v in med.items() if k.startswith("ref"))[len(fns) // 2] if fns else float("nan")
    passes = population_passes(a.population, dim, noises, a.repeats)
    write_s = passes["write"]
    out: dict = {
        "model": f"MLP {IN_OUT}-{h}-{h}-{IN_OUT}",
        "dim": dim,
        "population": a.population,
        "batch": a.batch,
        "repeats": a.repeats,
        "threads": torch.get_num_threads(),
        "reference": "P distinct MLPs in one pass, baddbmm over stacked weights",
        "reference_seconds": ref_s,
        # the physical floor of a dense strategy: the reference (which reads the P x d weights)
        # plus one write of the P x d float32 population
        "population_write_seconds": write_s,
        "floor_ratio": (ref_s + write_s) / ref_s,
        # drawing the P x d numbers a dense strategy samples, per noise kind, in reference passes
        "draw_ratio": {n: passes[n] / ref_s for n in noises},
        "strategies": {},
        "skipped": {n: SKIPPED[n] for n in names if n in SKIPPED},
    }
    for i, name in enumerate(fns):
        out["strategies"][name] = {
            "seconds_per_generation": med[name],
            "ratio": med[name] / ref_s,
            "ratio_to_adjacent_reference": med[name] / med[f"ref{i}"],
            "generations_before_timing": warmed.get(name, 0) + 1,
            **_sampling_facts(strategies.get(name)),
        }
    return out


if __name__ == "__main__":
    import sys

    print(json.dumps(run(sys.argv[1:]), indent=1))
