"""Oracle comparison of :class:`nograd.strategies.CMAES` against pycma (``import cma``).

For each function and dimension, both implementations start from the same ``x0`` and ``sigma0``
with the same default population size ``4 + floor(3 ln n)`` and run until the best loss of a
generation is ``<= target`` (1e-8), their own termination criteria fire, or ``max_evals`` is spent.
Evaluations are counted the same way for both (whole generations of ``popsize``); a run that misses
the target counts as ``inf``. Reported: the median over seeds of the evaluations to target, and the
ratio ours / pycma. Rastrigin is run with a large population (``--rastrigin-popsize``, IPOP-like) from
random ``x0`` in ``[-4, 4]^n``; reported is the success rate (global optimum, ``f <= 1e-8``).
:class:`~nograd.strategies.SepCMAES` is compared the same way with pycma's ``CMA_diagonal=True`` on
the separable ellipsoid.

pycma runs with its defaults (active CMA, as ours) except ``ftarget``; its seeds are ``seed + 1``
(pycma treats seed 0 as "random").

Usage::

    python -m nograd.bench.cma_oracle                 # full: 10 seeds x {10, 40} dims (a few minutes)
    python -m nograd.bench.cma_oracle --seeds 3 --dims 10 --json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from nograd.strategies import CMAES, SepCMAES
from nograd.strategies import functions as F

TARGET = 1e-8

# function name -> (x0 for dimension n, sigma0, evaluation budget for dimension n)
SETUPS: dict[str, tuple[Callable[[int], list[float]], float, Callable[[int], int]]] = {
    "sphere": (lambda n: [1.0] * n, 1.0, lambda n: 2000 * n),
    "ellipsoid": (lambda n: [1.0] * n, 1.0, lambda n: 10000 * n),
    "rosenbrock": (lambda n: [0.0] * n, 0.5, lambda n: 10000 * n),
    "separable-ellipsoid": (lambda n: [1.0] * n, 1.0, lambda n: 10000 * n),
}


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Best effort: run numpy's OpenBLAS (used by pycma) on one thread inside the block.

    pycma's small matrix products are slower with several BLAS threads on a busy machine. Uses
    ``threadpoolctl`` when installed, else numpy's bundled scipy-openblas through ctypes, else
    does nothing.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
        return
    setter = getter = None
    try:
        libs = glob.glob(
            os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*.so*")
        )
        lib = ctypes.CDLL(libs[0]) if libs else None
        setter = getattr(lib, "scipy_openblas_set_num_threads64_", None)
        getter = getattr(lib, "scipy_openblas_get_num_threads64_", None)
    except OSError:
        pass
    if setter is None or getter is None:
        yield
        return
    old = int(getter())
    setter(1)
    try:
        yield
    finally:
        setter(old)


def _losses(fn: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor | Sequence) -> torch.Tensor:
    return fn(torch.as_tensor(np.asarray(X), dtype=torch.float64))


def run_ours(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x0: Sequence[float],
    sigma0: float,
    seed: int,
    max_evals: int,
    popsize: int | None = None,
    target: float = TARGET,
    diagonal: bool = False,
) -> float:
    """Evaluations until a generation's best loss is ``<= target`` (``inf`` if never).

    ``diagonal=True`` runs :class:`~nograd.strategies.SepCMAES` instead of full CMA-ES.
    """
    cls = SepCMAES if diagonal else CMAES
    es = cls(list(x0), sigma0, popsize=popsize, seed=seed)
    while es.evaluations + es.popsize <= max_evals:
        f = _losses(fn, es.ask())
        es.tell(f)
        if float(f.min()) <= target:
            return float(es.evaluations)
        if es.stop():
            break
    return math.inf


def run_pycma(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x0: Sequence[float],
    sigma0: float,
    seed: int,
    max_evals: int,
    popsize: int | None = None,
    target: float = TARGET,
    diagonal: bool = False,
) -> float:
    """The same with ``cma.CMAEvolutionStrategy`` (default options, ``ftarget=target``).

    ``diagonal=True`` sets pycma's ``CMA_diagonal`` (its sep-CMA-ES).
    """
    import cma

    opts = {"seed": seed + 1, "verbose": -9, "ftarget": target, "maxfevals": max_evals}
    if popsize is not None:
        opts["popsize"] = popsize
    if diagonal:
        opts["CMA_diagonal"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycma's numerical UserWarnings
        es = cma.CMAEvolutionStrategy(list(x0), sigma0, opts)
        evals = 0
        while not es.stop():
            X = es.ask()
            f = _losses(fn, X)
            es.tell(X, f.tolist())
            evals += len(X)
            if float(f.min()) <= target:
                return float(evals)
    return math.inf


def compare(name: str, dim: int, seeds: Sequence[int], diagonal: bool = False) -> dict:
    """Median evaluations to ``TARGET`` of ours and pycma on one function/dimension."""
    make_x0, sigma0, budget = SETUPS[name]
    fn = F.FUNCTIONS[name]
    x0 = make_x0(dim)
    t0 = time.perf_counter()
    ours = [run_ours(fn, x0, sigma0, s, budget(dim), diagonal=diagonal) for s in seeds]
    t1 = time.perf_counter()
    ref = [run_pycma(fn, x0, sigma0, s, budget(dim), diagonal=diagonal) for s in seeds]
    t2 = time.perf_counter()
    m_ours, m_ref = statistics.median(ours), statistics.median(ref)
    return {
        "function": ("sep-cma " if diagonal else "") + name,
        "dim": dim,
        "seeds": len(seeds),
        "ours": ours,
        "pycma": ref,
        "median_ours": m_ours,
        "median_pycma": m_ref,
        "ratio": m_ours / m_ref if math.isfinite(m_ref) else math.nan,
        "seconds_ours": round(t1 - t0, 2),
        "seconds_pycma": round(t2 - t1, 2),
    }


def rastrigin_x0(dim: int, seed: int) -> list[float]:
    return np.random.RandomState(1000 + seed).uniform(-4, 4, dim).tolist()


def compare_rastrigin(dim: int, popsize: int, seeds: Sequence[int], sigma0: float = 2.0) -> dict:
    """Success rates (``f <= 1e-8``) on Rastrigin with a large population, same x0 per seed."""
    budget = 1500 * popsize
    ours = [run_ours(F.rastrigin, rastrigin_x0(dim, s), sigma0, s, budget, popsize) for s in seeds]
    ref = [run_pycma(F.rastrigin, rastrigin_x0(dim, s), sigma0, s, budget, popsize) for s in seeds]
    return {
        "function": "rastrigin",
        "dim": dim,
        "popsize": popsize,
        "seeds": len(seeds),
        "success_ours": sum(math.isfinite(e) for e in ours) / len(seeds),
        "success_pycma": sum(math.isfinite(e) for e in ref) / len(seeds),
        "ours": ours,
        "pycma": ref,
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--dims", type=int, nargs="+", default=[10, 40])
    p.add_argument("--functions", nargs="+", default=["sphere", "ellipsoid", "rosenbrock"])
    p.add_argument("--sep-dims", type=int, nargs="*", default=[20, 100], help="sep-CMA vs CMA_diagonal")
    p.add_argument("--rastrigin-popsize", type=int, default=200, help="0 skips Rastrigin")
    p.add_argument("--threads", type=int, default=1, help="torch threads (small problems: 1 is fastest)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = range(args.seeds)
    jobs = [(compare, (name, dim, seeds)) for dim in args.dims for name in args.functions]
    jobs += [(compare, ("separable-ellipsoid", dim, seeds, True)) for dim in args.sep_dims]
    if args.rastrigin_popsize:
        jobs.append((compare_rastrigin, (10, args.rastrigin_popsize, seeds)))
    rows = []
    for fn, job_args in jobs:
        with single_threaded_blas():
            r = fn(*job_args)
        rows.append(r)
        if not args.json:
            print(_format(r), flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


def _format(r: dict) -> str:
    if r["function"] == "rastrigin":
        return (
            f"rastrigin  n={r['dim']:<3} popsize={r['popsize']}: success ours {r['success_ours']:.0%}  "
            f"pycma {r['success_pycma']:.0%}  ({r['seeds']} seeds)"
        )
    return (
        f"{r['function']:<27} n={r['dim']:<3} median evals ours {r['median_ours']:>8.0f}  "
        f"pycma {r['median_pycma']:>8.0f}  ratio {r['ratio']:.2f}  ({r['seeds']} seeds, "
        f"{r['seconds_ours']}s / {r['seconds_pycma']}s)"
    )


if __name__ == "__main__":
    main()
