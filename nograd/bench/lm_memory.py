"""``nograd bench lm-memory``: memory of one fine-tuning step of a pretrained LM against inference.

Every measurement runs in a fresh process that sets up the same run as ``nograd train --task
tweets-binary`` would (the pretrained model, LoRA, a prefix or neither, the method), draws the
same batch, and then does one thing once: an inference forward of that batch (``inference``),
or one training step of a method (``mezo-full``, ``mezo-lora``, ``mezo-prefix``, ``adamw-full``,
``adamw-lora``, ``eggroll-lora``). After the set-up the process's peak-RSS mark is reset (Linux
``clear_refs``), so what the step adds is its own peak above the set-up: activations, gradients,
optimizer state, perturbation buffers. With the weights' bytes ``W``:

    memory_ratio(method) = (W + added(method)) / (W + added(inference))

which is MeZO's comparison (Malladi et al. 2023, Figure 3: weights plus what a step needs).
``eggroll_time_ratio`` is the EGGROLL population's forward (``P`` members of ``b`` rows, one
batched forward) over plain inference of the same ``P * b`` rows: how close a population gets
to inference speed (1.0 = as fast).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

from ..core import gemm
from ..core.noise import DISTRIBUTIONS
from . import BenchArgumentParser
from .memory import measure_each, peak_rss

METHODS = {
    "inference": ("mezo", "full"),
    "mezo-full": ("mezo", "full"),
    "mezo-lora": ("mezo", "lora"),
    "mezo-prefix": ("mezo", "prefix"),
    "adamw-full": ("adamw", "full"),
    "adamw-lora": ("adamw", "lora"),
    "eggroll-lora": ("eggroll", "lora"),
}


def _args(argv: list[str]) -> argparse.Namespace:
    p = BenchArgumentParser(prog="nograd bench lm-memory", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--task", default="tweets-binary", help="a prompt-classification task (default: tweets-binary)"
    )
    p.add_argument("--model", default=None, help="the LM (default: the task's, SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="labelled CSV/JSONL for --task text-classification")
    p.add_argument("--classes", default=None, help="the classes, for --task text-classification")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--population", type=int, default=8, help="EGGROLL members (default: 8)")
    p.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS)
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the weights' dtype")
    p.add_argument(
        "--noise",
        default="gaussian",
        choices=DISTRIBUTIONS,
        help="the zeroth-order methods' noise distribution (as --opt distribution=...)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.population % 2:
        raise ValueError("--population must be even (antithetic pairs)")
    return args


def _reset_peak() -> int:
    """Reset Linux's peak-RSS mark to the current RSS and return that RSS (bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss()


def _setup(args: argparse.Namespace, method: str, out: str):  # -> (Run, x, y)
    import torch

    from ..workbench import make_config
    from ..workbench.loop import Run

    torch.set_num_threads(args.threads)
    optimizer, train = METHODS[method]
    values = {
        "task": args.task,
        "optimizer": optimizer,
        "train": train,
        "steps": 1,
        "out": out,
        "quiet": True,
        "batch_size": args.batch_size,
        "test_size": 2,
        "k": 4,
        "population": args.population,
        "dtype": args.dtype,
    }
    if optimizer == "mezo" and args.noise != "gaussian":
        values["opts"] = {"distribution": args.noise}
    values.update(
        {k: v for k, v in (("model", args.model), ("data", args.data), ("classes", args.classes)) if v}
    )
    run = Run.setup(make_config(**values))
    x, y = run.task.sampler.sample()
    return run, x, y


def _child(args: argparse.Namespace) -> dict:
    import time

    import torch

    with tempfile.TemporaryDirectory() as out:
        run, x, y = _setup(args, args.child, out)
        weights = sum(p.numel() * p.element_size() for p in run.model.parameters())
        gc.collect()
        base = _reset_peak()
        with gemm.linears_through(run.model):  # as `nograd train` runs its forwards
            if args.child == "inference":
                with torch.no_grad():
                    run.task.per_example_loss(run.model, x, y)
            else:
                run.method.step(x, y, 1.0)
        result = {
            "added_bytes": peak_rss() - base,
            "weight_bytes": weights,
            "trainable": sum(p.numel() for p in run.model.parameters() if p.requires_grad),
        }
        if args.child == "eggroll-lora":  # the population forward against inference of as many rows
            es = run.method.es
            rows_x = x.repeat(es.population, 1)
            rows_y = y.repeat(es.population)
            times = {"population": [], "inference": []}
            with torch.no_grad():
                for _ in range(3):
                    t = time.perf_counter()
                    es.evaluate(run.task.per_example_loss, x, y)
                    times["population"].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    run.task.per_example_loss(run.model, rows_x, rows_y)
                    times["inference"].append(time.perf_counter() - t)
            result["time_ratio"] = sorted(times["population"])[1] / sorted(times["inference"])[1]
    return result


def run(argv: list[str]) -> dict:
    args = _args(argv)
    if args.child:
        return _child(args)
    if not os.path.exists("/proc/self/clear_refs"):
        raise ValueError("bench lm-memory needs Linux (/proc/self/clear_refs resets the peak-RSS mark)")
    measured = measure_each(argv, args.methods, list(METHODS), "nograd.bench.lm_memory")
    w = measured["inference"]["weight_bytes"]
    inference = w + measured["inference"]["added_bytes"]
    out = {
        "task": args.task,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "noise": args.noise,
        "weight_bytes": w,
        "added_bytes": {m: r["added_bytes"] for m, r in measured.items()},
        "trainable": {m: r["trainable"] for m, r in measured.items() if m != "inference"},
        "memory_ratios": {
            m: (w + r["added_bytes"]) / inference for m, r in measured.items() if m != "inference"
        },
    }
    if "eggroll-lora" in measured:
        out["eggroll_population"] = args.population
        out["eggroll_time_ratio"] = measured["eggroll-lora"]["time_ratio"]
    return out


if __name__ == "__main__":
    result = run(sys.argv[1:])
    print(json.dumps(result))
