"""The ``nograd`` command line.

Each subcommand is a pair of functions registered with :func:`command`: one
adds its arguments to an argparse parser, the other runs it and returns the
exit status. To add one, write both in a module, decorate the runner, and
list the module in :data:`COMMAND_MODULES` (or write them here)::

    def _suite_args(p: argparse.ArgumentParser, argv: list[str]) -> None:
        p.add_argument("--suite", default="quick")

    @command("suite", "compare optimizers on a fixed budget", _suite_args)
    def cmd_suite(args: argparse.Namespace) -> int:
        ...
        return 0

Errors: library code raises :class:`nograd.core.errors.UsageError`; :func:`main`
prints it as one line ``nograd: error: ...`` on stderr and exits with 2, as
it does for argparse's own errors (unknown flag, bad number). A
:class:`~nograd.core.errors.RunAborted` (a process of a distributed run died or
hung) is one line too, with exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import TYPE_CHECKING

from nograd import __version__
from nograd.core.errors import RunAborted, UsageError
from nograd.core.options import field_types, flag_name

if TYPE_CHECKING:
    from nograd.workbench.config import TrainConfig

PROG = "nograd"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as a UsageError (one line, exit 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser, list[str]], None]  # (parser, the command's argv)
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
"""Registered subcommands, in the order they appear in ``nograd --help``."""

COMMAND_MODULES: list[str] = []
"""Modules that register more subcommands when imported (plug-ins above this one)."""


def command(
    name: str, help: str, configure: Callable[[argparse.ArgumentParser, list[str]], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Decorator registering ``run(args) -> exit status`` as subcommand ``name``.

    ``configure(parser, argv)`` adds the command's arguments; ``argv`` is what follows the
    command's name, for commands whose flags depend on other flags (``train --task NAME``).
    """

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


SCHEDULE_FIELDS = ("lr", "warmup", "lr_decay_steps", "min_lr_ratio", "weight_decay")
FORWARD_ONLY_FIELDS = ("population", "sigma", "rank", "eps", "directions", "outer")


def add_options(group: argparse._ArgumentGroup, config_cls: type, names: Sequence[str] | None = None) -> None:
    """One flag per :func:`~nograd.core.options.option` field of ``config_cls`` (``names``: only those).

    Every flag defaults to None, so the caller knows which ones the user gave (a resumed run
    rejects ones that contradict its checkpoint); the dataclass holds the real defaults.
    """
    types = field_types(config_cls)
    for f in fields(config_cls):
        if not f.metadata.get("cli") or (names is not None and f.name not in names):
            continue
        base, _ = types[f.name]
        default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
        text = f.metadata["help"]
        if default is not None and default is not False and default != "":
            shown = repr(default) if isinstance(default, str) and not default.isprintable() else default
            text += f" (default: {shown})".replace("%", "%%")  # argparse formats help with %
        if f.metadata["choices"]:
            text += f"; one of {', '.join(map(str, f.metadata['choices']))}"
        if base is bool:
            group.add_argument(flag_name(f.name), action="store_true", default=None, help=text)
        else:
            group.add_argument(
                flag_name(f.name),
                type=base,
                default=None,
                metavar=f.metadata["metavar"] or {int: "N", float: "X"}.get(base, f.name.upper()),
                help=text,
            )


def _task_of(argv: list[str]) -> str:
    """The task whose flags ``train`` takes: --task, else a resumed checkpoint's, else the default."""
    from nograd.workbench.checkpoint import load_checkpoint
    from nograd.workbench.config import TrainConfig, resume_path

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task")
    pre.add_argument("--resume", nargs="?", const="auto")
    pre.add_argument("--out")
    pre.add_argument("--optimizer")
    known, _ = pre.parse_known_args(argv)
    if known.task or not known.resume:
        return known.task or TrainConfig.task
    try:
        pending = TrainConfig(
            resume=known.resume, out=known.out, optimizer=known.optimizer or TrainConfig.optimizer
        )
        task = load_checkpoint(resume_path(pending))["config"]["task"]
    except (UsageError, KeyError, TypeError):
        return TrainConfig.task  # train() reports what is wrong with the checkpoint
    return task if isinstance(task, str) else TrainConfig.task


def _train_args(p: argparse.ArgumentParser, argv: list[str]) -> None:
    from nograd.tasks import get_task
    from nograd.workbench.config import TrainConfig, shared_fields

    task = get_task(_task_of(argv))
    run_fields = [n for n in shared_fields() if n not in SCHEDULE_FIELDS + FORWARD_ONLY_FIELDS]
    g = p.add_argument_group("run")
    add_options(g, TrainConfig, run_fields)
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CHECKPOINT",
        help="continue from CHECKPOINT (default: <out>/checkpoint.pt)",
    )
    add_options(
        p.add_argument_group(f"task {task.name} (`nograd train --task NAME --help` for another task's)"),
        task.Config,
    )
    add_options(p.add_argument_group("learning-rate schedule"), TrainConfig, SCHEDULE_FIELDS)
    g = p.add_argument_group("forward-only methods (default: the method's own)")
    add_options(g, TrainConfig, FORWARD_ONLY_FIELDS)
    g.add_argument(
        "--opt",
        action="append",
        metavar="KEY=VALUE",
        help="method-specific option (repeatable), e.g. --opt beta2=0.95",
    )
    p.set_defaults(_task=task.name)


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, set[str]]:
    """A TrainConfig from parsed ``train`` flags, and the set of fields the user gave."""
    from nograd.tasks import get_task
    from nograd.workbench.config import make_config, shared_fields

    names = shared_fields() + [f.name for f in fields(get_task(args._task).Config)]
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if args.opt:
        given["opts"] = dict(parse_opt(o) for o in args.opt)
    return make_config(**{"task": args._task, **given}), set(given)


@command("train", "train a model with one optimizer", _train_args)
def cmd_train(args: argparse.Namespace) -> int:
    from nograd.workbench import train

    cfg, explicit = config_from_args(args)
    joined = int(os.environ.get("WORLD_SIZE", "1")) > 1
    train(cfg, explicit=explicit, end_group=not joined)
    if joined:  # every rank is past the final barrier: leave without tearing the group down
        _leave(0)
    return 0


# ---------------------------------------------------------------- sample


def _sample_args(p: argparse.ArgumentParser, argv: list[str]) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `nograd train`")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--chars", type=int, default=300, help="characters to generate (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest characters only")


@command("sample", "generate text from a checkpoint", _sample_args)
def cmd_sample(args: argparse.Namespace) -> int:
    from nograd.tasks import get_task
    from nograd.workbench.checkpoint import load_checkpoint

    if args.chars < 0:
        raise UsageError(f"--chars must be >= 0, got {args.chars}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k <= 0:
        raise UsageError(f"--top-k must be > 0, got {args.top_k}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    ckpt = load_checkpoint(args.checkpoint)
    config = ckpt.get("config")
    task = get_task(config.get("task", "") if isinstance(config, dict) else "")
    generate = getattr(task, "generate", None)
    if generate is None:
        raise UsageError(f"task {task.name} does not generate text")
    print(generate(ckpt, args.prompt, args.chars, args.temperature, args.top_k, args.seed))
    return 0


# ---------------------------------------------------------------- replay


def _replay_args(p: argparse.ArgumentParser, argv: list[str]) -> None:
    p.add_argument("--checkpoint", required=True, help="the initial weights (e.g. trajectory.jsonl.init.pt)")
    p.add_argument("--log", required=True, help="trajectory.jsonl written with --opt trajectory=auto|PATH")
    p.add_argument("--out", required=True, help="where to write the replayed weights")


@command(
    "replay", "rebuild a ZO run's final weights from its initial weights and trajectory log", _replay_args
)
def cmd_replay(args: argparse.Namespace) -> int:
    from nograd.workbench.replay import replay_command

    try:
        result = replay_command(args.checkpoint, args.log, args.out)
    except (ValueError, OSError) as e:  # a damaged log or an unreadable file
        raise UsageError(f"replay: {e}") from None
    applied, steps, tensors = result["applied"], result["steps"], result["tensors"]
    print(f"replayed {applied} of {steps} steps onto {tensors} tensors -> {args.out}")
    return 0


# ---------------------------------------------------------------- optimizers


@command("optimizers", "list the registered optimizers", lambda p, argv: None)
def cmd_optimizers(args: argparse.Namespace) -> int:
    from nograd.workbench.registry import load_methods

    methods = load_methods()
    width = max(len(n) for n in methods)
    print(f"{'name':<{width}}  {'forward-only':<12}  summary")
    for name in sorted(methods):
        m = methods[name]
        print(f"{name:<{width}}  {'yes' if m.forward_only else 'no':<12}  {m.summary}")
    return 0


# ---------------------------------------------------------------- compare


def _compare_args(p: argparse.ArgumentParser, argv: list[str]) -> None:
    p.add_argument(
        "spec", nargs="?", metavar="SPEC.toml", help="the comparison (see nograd.workbench.compare)"
    )
    p.add_argument("--out", metavar="DIR", help="results folder (default: the spec's out)")
    p.add_argument("--jobs", type=int, metavar="N", help="cells run at once (default: the spec's jobs)")
    p.add_argument(
        "--only", metavar="A,B,...", help="run only these methods of the spec (and their budget's)"
    )
    flags = p.add_argument_group("or, without a spec file")
    flags.add_argument("--task", help="task name")
    flags.add_argument("--methods", metavar="A,B,...", help="optimizer names")
    flags.add_argument("--seeds", default="0", metavar="S,T,...", help="seeds (default 0)")
    units = {"steps": "steps", "minutes": "minutes of training", "tokens": "forward-token-equivalents"}
    for kind, unit in units.items():
        flags.add_argument(f"--{kind}", type=float, metavar="X", help=f"budget in {unit}")
    flags.add_argument("--target", type=float, action="append", default=[], help="a level to time (repeat)")
    flags.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a train flag for every cell (repeat)"
    )


def _spec_from_flags(args: argparse.Namespace) -> dict:
    if not args.task or not args.methods:
        raise UsageError("compare needs SPEC.toml, or --task and --methods")
    budgets = {k: getattr(args, k) for k in ("steps", "minutes", "tokens") if getattr(args, k) is not None}
    if len(budgets) > 1:
        raise UsageError("give one of --steps, --minutes, --tokens")
    task: dict = {"task": args.task}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        try:  # numbers and true/false as in a TOML spec; anything else is a string
            task[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            task[key.replace("-", "_")] = value
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {args.seeds!r}: expected whole numbers separated by commas") from None
    methods = {m: {"optimizer": m} for m in args.methods.split(",") if m}
    raw = {"tasks": {args.task: task}, "methods": methods, "seeds": seeds, "targets": args.target}
    if budgets:
        kind, value = next(iter(budgets.items()))
        raw["budget"] = {kind: int(value) if kind == "steps" and value == int(value) else value}
    return raw


@command("compare", "run methods x tasks x seeds at one budget; write a table and plots", _compare_args)
def cmd_compare(args: argparse.Namespace) -> int:
    from nograd.workbench.compare import compare, load_spec, parse_spec

    spec = load_spec(args.spec, args.out) if args.spec else parse_spec(_spec_from_flags(args), args.out)
    if args.jobs is not None:
        if args.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
        spec.jobs = args.jobs
    if args.only:
        spec.only([m for m in args.only.split(",") if m])
    written = compare(spec)
    for path in [written["csv"], written["table"], *written["plots"]]:
        print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- tasks


@command(
    "tasks", "list the tasks (`nograd train --task NAME --help` lists one's flags)", lambda p, argv: None
)
def cmd_tasks(args: argparse.Namespace) -> int:
    from nograd.tasks import TASKS

    width = max(len(n) for n in TASKS)
    for name in sorted(TASKS):
        print(f"{name:<{width}}  {TASKS[name].summary}")
    return 0


# ---------------------------------------------------------------- map


def _map_args(p: argparse.ArgumentParser, argv: list[str]) -> None:
    from nograd.workbench.trainability import MapConfig

    g = p.add_argument_group("map")
    add_options(g, MapConfig)
    g.add_argument("--out", required=True, help="folder for map.png, map.json and map.npz")
    g.add_argument(
        "--lr-range", nargs=2, type=float, metavar=("LO", "HI"), help="log10 lr of both axes (default: -3 6)"
    )
    g.add_argument("--x-range", nargs=2, type=float, metavar=("LO", "HI"), help="log10 lr of the input layer")
    g.add_argument(
        "--y-range", nargs=2, type=float, metavar=("LO", "HI"), help="log10 lr of the output layer"
    )
    g.add_argument(
        "--zoom",
        nargs=3,
        type=float,
        metavar=("CX", "CY", "WIDTH"),
        help="map only the square window of side WIDTH (log10 units) centred on (CX, CY)",
    )
    g.add_argument("--no-raw", action="store_true", help="do not write the raw scores (map.npz)")


@command(
    "map", "trainability map: which two learning rates train a tiny network (Sohl-Dickstein 2024)", _map_args
)
def cmd_map(args: argparse.Namespace) -> int:
    from nograd.core.allocator import retain_freed_memory
    from nograd.workbench.trainability import MapConfig, run_maps, zoom_window

    given = {
        f.name: getattr(args, f.name) for f in fields(MapConfig) if getattr(args, f.name, None) is not None
    }
    if args.lr_range:
        given["x_range"] = given["y_range"] = tuple(args.lr_range)
    if args.x_range:
        given["x_range"] = tuple(args.x_range)
    if args.y_range:
        given["y_range"] = tuple(args.y_range)
    if args.zoom:
        given["x_range"], given["y_range"] = zoom_window(*args.zoom)
    retain_freed_memory()  # every chunk allocates and frees its activations, as a population does
    progress = _map_progress if sys.stderr.isatty() else None
    run_maps(MapConfig(**given), args.out, raw=not args.no_raw, progress=progress)
    return 0


def _map_progress(name: str, done: int, total: int) -> None:
    end = "\n" if done == total else ""
    print(f"\r{name}: {done}/{total} pixels", end=end, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- budget-law


def _budget_law_args(p: argparse.ArgumentParser, argv: list[str]) -> None:
    p.add_argument("folder", help="a `nograd compare` results folder (forward-only and gradient runs)")
    p.add_argument(
        "--targets",
        type=float,
        nargs="+",
        metavar="LEVEL",
        help="levels of the task's metric (default: the targets of the folder's results.csv)",
    )


@command(
    "budget-law",
    "fit the generations black-box runs need to reach each target against model size and population",
    _budget_law_args,
)
def cmd_budget_law(args: argparse.Namespace) -> int:
    from nograd.workbench.budget_law import markdown, run_budget_law, targets_of

    targets = args.targets or targets_of(args.folder)
    result = run_budget_law(args.folder, targets)
    print(markdown(result), end="")
    return 0


# ---------------------------------------------------------------- bench


def _bench_args(p: argparse.ArgumentParser, argv: list[str]) -> None:
    from nograd.bench import BENCHES

    names = ", ".join(f"{n} ({s})" for n, (_, s) in BENCHES.items())
    p.add_argument("name", metavar="NAME", help=f"one of: {names}")
    p.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (see NAME --help)")


@command("bench", "run a benchmark and print its figures as JSON", _bench_args)
def cmd_bench(args: argparse.Namespace) -> int:
    from nograd.bench import BENCHES, POPULATION_BENCHES, get
    from nograd.core.allocator import retain_freed_memory

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


# ---------------------------------------------------------------- main


def _leave(status: int) -> None:
    """Exit at once (flushed, no interpreter teardown): for processes of a torch.distributed group."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def build_parser(argv: Sequence[str] = ()) -> ArgumentParser:
    """The ``nograd`` parser; ``argv`` lets a command shape its flags (``train --task NAME``)."""
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    argv = list(argv)
    parser = ArgumentParser(
        prog=PROG, description="Train neural networks with forward passes only, and compare with gradients."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p, argv[1:] if argv and argv[0] == cmd.name else [])
        p.set_defaults(_run=cmd.run)
    return parser


def _check_environment() -> None:
    """Settings read from the environment, checked before any work (one line if one is bad)."""
    from nograd.core import gemm

    try:
        gemm.backend()
    except ValueError as e:
        raise UsageError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nograd`` script; returns the exit status."""
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        _check_environment()
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help(sys.stderr)
            return 2
        return args._run(args)
    except UsageError as e:
        message = " ".join(str(e).split())  # always exactly one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except RunAborted as e:  # a process died or hung, or the processes diverged
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        if e.exit_now:  # a broken communicator's threads abort the interpreter's exit: leave now
            _leave(1)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
