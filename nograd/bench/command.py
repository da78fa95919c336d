"""The ``nograd bench NAME [options] --json`` subcommand: runs a registered benchmark and prints
its result as JSON on stdout."""

from __future__ import annotations

import argparse
import json

from nograd.allocator import retain_freed_memory
from nograd.cli import command
from nograd.errors import UsageError

from . import BENCHES, POPULATION_BENCHES, get


def _bench_args(p: argparse.ArgumentParser) -> None:
    names = ", ".join(f"{n} ({s})" for n, (_, s) in BENCHES.items())
    p.add_argument("name", metavar="NAME", help=f"one of: {names}")
    p.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (see NAME --help)")


@command("bench", "run a benchmark and print its figures as JSON", _bench_args)
def cmd_bench(args: argparse.Namespace) -> int:
    if args.name not in BENCHES:
        raise UsageError(f"unknown benchmark {args.name!r}; choose from {', '.join(BENCHES)}")
    if args.name in POPULATION_BENCHES:
        retain_freed_memory()  # as `nograd train` does for the population methods
    try:
        result = get(args.name)(list(args.options))
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(result, indent=2))
    return 0
