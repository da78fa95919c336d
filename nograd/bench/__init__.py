"""Benchmarks behind ``nograd bench NAME --json``.

Each benchmark is a function ``run(args: list[str]) -> dict`` registered in ``BENCHES``; the CLI
prints the returned dict as JSON. Figures are ratios measured within one run, so a noisy
machine shifts both sides of each ratio alike.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from importlib import import_module

from nograd.core.errors import UsageError
from nograd.core.options import check_device, check_value


class BenchArgumentParser(argparse.ArgumentParser):
    """Bad benchmark options raise ValueError (shown by the CLI as one line, exit 2).

    Numbers are checked by class, as ``nograd train`` checks its flags
    (:func:`nograd.core.options.check_value`): integers are whole numbers >= 1 unless the
    argument says ``minimum=0``; floats are finite, > 0 and within float32. ``--device`` must be
    one this machine has.
    """

    def add_argument(self, *names: str, minimum: int = 1, **kwargs):  # type: ignore[override]
        action = super().add_argument(*names, **kwargs)
        action.minimum = minimum  # type: ignore[attr-defined]
        return action

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        try:
            for action in self._actions:
                value = getattr(parsed, action.dest, None)
                if value is None or action.type not in (int, float):
                    continue
                meta = {"min": getattr(action, "minimum", 1), "above": None, "max": None, "below": None}
                if action.type is float:
                    meta.update(min=None, above=0)
                check_value(action.dest, value, action.type, True, meta)
            if getattr(parsed, "device", None) is not None:
                check_device(parsed.device)
        except UsageError as e:
            raise ValueError(f"{self.prog}: {e}") from None
        return parsed

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(f"{self.prog}: {message}")


# name -> (module path, one-line summary); modules are imported lazily
BENCHES: dict[str, tuple[str, str]] = {}
# benchmarks of population evaluation: run with freed memory kept (nograd.core.allocator)
POPULATION_BENCHES = frozenset({"throughput", "es", "nres"})


def register(name: str, module: str, summary: str) -> None:
    BENCHES[name] = (module, summary)


def get(name: str) -> Callable[[list[str]], dict]:
    if name not in BENCHES:
        raise KeyError(name)
    return import_module(BENCHES[name][0]).run


register("throughput", "nograd.bench.throughput", "batched low-rank population vs plain inference throughput")
register("memory", "nograd.bench.memory", "peak memory and time of one in-place ZO step vs inference")
register(
    "es", "nograd.bench.es", "seconds per ES generation (each strategy) / batched inference of P MLP copies"
)
register(
    "lm-memory",
    "nograd.bench.lm_memory",
    "peak memory of one fine-tuning step of a pretrained LM (MeZO, AdamW, EGGROLL) vs inference",
)
register(
    "distributed",
    "nograd.bench.distributed",
    "generations/s of one population on 1 and N processes, bytes sent, a scaling model",
)
register(
    "nres", "nograd.bench.nres_tbptt", "NRES vs truncated backprop on influence balancing (episode loss)"
)
