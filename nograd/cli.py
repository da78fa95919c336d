"""The ``nograd`` command line.

Each subcommand is a pair of functions registered with :func:`command`: one
adds its arguments to an argparse parser, the other runs it and returns the
exit status. To add one, write both in a module, decorate the runner, and
list the module in :data:`COMMAND_MODULES` (or write them here)::

    def _bench_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--suite", default="quick")

    @command("bench", "compare optimizers on a fixed budget", _bench_args)
    def cmd_bench(args: argparse.Namespace) -> int:
        ...
        return 0

Errors: library code raises :class:`nograd.errors.UsageError`; :func:`main`
prints it as one line ``nograd: error: ...`` on stderr and exits with 2, as
it does for argparse's own errors (unknown flag, bad number).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from nograd import __version__
from nograd.errors import UsageError

if TYPE_CHECKING:
    from nograd.train import TrainConfig

PROG = "nograd"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as a UsageError (one line, exit 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
"""Registered subcommands, in the order they appear in ``nograd --help``."""

COMMAND_MODULES: list[str] = ["nograd.bench.command"]
"""Modules that register more subcommands when imported."""


def command(
    name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Decorator registering ``run(args) -> exit status`` as subcommand ``name``."""

    def decorator(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return decorator


# ---------------------------------------------------------------- train


def parse_opt(text: str) -> tuple[str, str]:
    """``"KEY=VALUE"`` -> (key, value); anything else is a UsageError."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--opt expects KEY=VALUE, got {text!r}")
    return key, value.strip()


def _train_args(p: argparse.ArgumentParser) -> None:
    # Every default is None so that we know which flags the user gave (a
    # resumed run rejects ones that contradict its checkpoint); TrainConfig
    # holds the real defaults.
    g = p.add_argument_group("run")
    g.add_argument("--task", help="task to train on (default: shakespeare-char)")
    g.add_argument("--optimizer", help="method name, see `nograd optimizers` (default: adamw)")
    g.add_argument("--steps", type=int, help="optimizer steps (default: 2000)")
    g.add_argument("--budget-minutes", type=float, help="stop after this much training wall time")
    g.add_argument("--eval-every", type=int, help="steps between evaluations/checkpoints (default: 250)")
    g.add_argument("--eval-batches", type=int, help="fixed validation batches (default: 50)")
    g.add_argument("--seed", type=int, help="random seed (default: 0)")
    g.add_argument("--out", help="output folder (default: runs/<task>-<optimizer>)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CHECKPOINT",
        help="continue from CHECKPOINT (default: <out>/checkpoint.pt)",
    )
    g.add_argument("--data", help="Tiny Shakespeare text file (default: $NOGRAD_DATA, cache, download)")
    g.add_argument("--device", help="cpu or cuda (default: cpu)")
    g.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: one per core; 1 is often fastest for small models)",
    )
    g.add_argument("--quiet", action="store_true", default=None, help="no progress bar or eval lines")
    g.add_argument("--sample-chars", type=int, help="characters of the final sample (default: 300)")
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, help="transformer blocks (default: 4)")
    g.add_argument("--n-head", type=int, help="attention heads (default: 4)")
    g.add_argument("--n-embd", type=int, help="embedding width (default: 128)")
    g.add_argument("--block-size", type=int, help="context length (default: 64)")
    g.add_argument("--dropout", type=float, help="dropout rate (default: 0)")
    g.add_argument("--attention", choices=("sdpa", "math"), help="attention kernel (default: sdpa)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, help="rows per step (default: 12)")
    g.add_argument("--lr", type=float, help="peak learning rate (default: the method's)")
    g.add_argument("--warmup", type=int, help="linear warmup steps (default: 100)")
    g.add_argument("--lr-decay-steps", type=int, help="end of the cosine decay (default: --steps)")
    g.add_argument("--min-lr-ratio", type=float, help="final lr as a fraction of --lr (default: 0.1)")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay (default: the method's)")
    g = p.add_argument_group("forward-only methods (default: the method's own)")
    g.add_argument("--population", type=int, help="population size / perturbations per step")
    g.add_argument("--sigma", type=float, help="perturbation scale for ES")
    g.add_argument("--rank", type=int, help="rank of low-rank perturbations")
    g.add_argument("--eps", type=float, help="finite-difference step for zeroth-order methods")
    g.add_argument("--directions", type=int, help="random directions per step for zeroth-order methods")
    g.add_argument("--outer", help="outer optimizer applied to an ES gradient estimate")
    g.add_argument(
        "--opt",
        action="append",
        metavar="KEY=VALUE",
        help="method-specific option (repeatable), e.g. --opt beta2=0.95",
    )


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """A TrainConfig from parsed ``train`` flags, and the set of fields the user gave."""
    from nograd.train import TrainConfig

    given: dict = {}
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            given[f.name] = value
    if args.opt:
        given["opts"] = dict(parse_opt(o) for o in args.opt)
    return TrainConfig(**given), set(given)


@command("train", "train a model with one optimizer", _train_args)
def cmd_train(args: argparse.Namespace) -> int:
    from nograd.train import train

    cfg, explicit = config_from_args(args)
    train(cfg, explicit=explicit)
    return 0


# ---------------------------------------------------------------- sample


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `nograd train`")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--chars", type=int, default=300, help="characters to generate (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest characters only")


@command("sample", "generate text from a checkpoint", _sample_args)
def cmd_sample(args: argparse.Namespace) -> int:
    from nograd.checkpoint import load_checkpoint
    from nograd.data import CharVocab
    from nograd.models.gpt import GPT, GPTConfig
    from nograd.tasks.shakespeare import generate_text

    if args.chars < 0:
        raise UsageError(f"--chars must be >= 0, got {args.chars}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k <= 0:
        raise UsageError(f"--top-k must be > 0, got {args.top_k}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    ckpt = load_checkpoint(args.checkpoint)
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        vocab = CharVocab(ckpt["task_meta"]["vocab"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UsageError(
            f"checkpoint {args.checkpoint!r} does not hold a usable model ({type(e).__name__})"
        ) from None
    text = generate_text(model, vocab, args.prompt, args.chars, args.temperature, args.top_k, args.seed)
    print(text)
    return 0


# ---------------------------------------------------------------- replay


def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="the initial weights (e.g. trajectory.jsonl.init.pt)")
    p.add_argument("--log", required=True, help="trajectory.jsonl written with --opt trajectory=auto|PATH")
    p.add_argument("--out", required=True, help="where to write the replayed weights")


@command(
    "replay", "rebuild a ZO run's final weights from its initial weights and trajectory log", _replay_args
)
def cmd_replay(args: argparse.Namespace) -> int:
    from nograd.zo.replay import replay_command

    try:
        result = replay_command(args.checkpoint, args.log, args.out)
    except (ValueError, OSError) as e:  # a damaged log or an unreadable file
        raise UsageError(f"replay: {e}") from None
    applied, steps, tensors = result["applied"], result["steps"], result["tensors"]
    print(f"replayed {applied} of {steps} steps onto {tensors} tensors -> {args.out}")
    return 0


# ---------------------------------------------------------------- optimizers


@command("optimizers", "list the registered optimizers", lambda p: None)
def cmd_optimizers(args: argparse.Namespace) -> int:
    from nograd.methods import load_methods

    methods = load_methods()
    width = max(len(n) for n in methods)
    print(f"{'name':<{width}}  {'forward-only':<12}  summary")
    for name in sorted(methods):
        m = methods[name]
        print(f"{name:<{width}}  {'yes' if m.forward_only else 'no':<12}  {m.summary}")
    return 0


# ---------------------------------------------------------------- main


def build_parser() -> ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = ArgumentParser(
        prog=PROG, description="Train neural networks with forward passes only, and compare with gradients."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nograd`` script; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help(sys.stderr)
            return 2
        return args._run(args)
    except UsageError as e:
        message = " ".join(str(e).split())  # always exactly one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
