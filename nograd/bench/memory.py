"""``nograd bench memory``: peak memory and time of one optimizer step against inference.

Every measurement runs in a fresh process that builds the same wide char GPT (random weights,
weights dominate memory) and does one thing once:

* ``inference``: one forward that computes the batch's loss, under ``torch.no_grad``;
* a zeroth-order step (``mezo``, ``zo-sign``, ...): two perturbed forwards and the update;
* ``adamw``: forward, backward and an AdamW step, for reference.

What a step *adds* is ``peak - memory after imports``: the process's peak RSS on CPU (Linux's
VmHWM, see :func:`peak_rss`), ``torch.cuda.max_memory_allocated`` on GPU. ``memory_ratio`` = step / inference.
``time_ratio`` = a MeZO step's time / the time of two inference forwards, timed interleaved in
one process (medians); ``time_ratio_rank1_noise`` the same with rank-1 matrix noise;
``time_ratio_table_noise`` with Gaussian noise read from the shared noise table (the
``mezo-table`` method gives that variant's memory, the table included), and
``time_ratio_counter_noise`` with exact Gaussians from the compiled counter-based generator
(``distribution="gaussian-counter"``, ``mezo-counter``; its kernel is compiled before timing).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence

from . import BenchArgumentParser

ZO_METHODS = (
    "mezo",
    "mezo-table",
    "mezo-counter",
    "zo-sign",
    "zo-momentum",
    "zo-adam",
    "hizoo",
    "forward-grad",
)
ALL_METHODS = ("inference", *ZO_METHODS, "adamw")


def _args(argv: list[str]) -> argparse.Namespace:
    p = BenchArgumentParser(prog="nograd bench memory", description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=10)
    p.add_argument("--n-embd", type=int, default=640)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma list of " + ", ".join(ALL_METHODS))
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (medians)")
    p.add_argument("--no-time", action="store_true", help="skip the time ratio")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _setup(args: argparse.Namespace):
    import torch

    from ..models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=65,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
    )
    model = GPT(cfg).to(args.device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 65, (args.batch_size, args.block_size), generator=gen).to(args.device)
    y = torch.randint(0, 65, (args.batch_size, args.block_size), generator=gen).to(args.device)

    def loss(m: torch.nn.Module = model) -> torch.Tensor:
        logits = m(x)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    return model, loss


def _step_fn(method: str, model, loss):
    """A function doing one step of ``method`` (built once, outside the measurement)."""
    import torch

    from .. import zo

    if method == "inference":

        def infer() -> None:
            with torch.no_grad():
                loss()

        return infer
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def backprop() -> None:
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()

        return backprop
    if method == "forward-grad":
        from ..models.gpt import set_attention

        set_attention(model, "math")  # forward-mode AD has no rule for the fused attention kernel
        opt = zo.ForwardGradient(model, lr=1e-4)
        fn = opt.step
        return lambda: fn(loss)
    cls = {
        "mezo": zo.MeZO,
        # the shared-noise-table Gaussian: its table counts towards the step's memory
        "mezo-table": functools.partial(zo.MeZO, distribution="gaussian-table"),
        "mezo-counter": functools.partial(zo.MeZO, distribution="gaussian-counter"),
        "zo-sign": zo.ZOSign,
        "zo-momentum": zo.ZOMomentum,
        "zo-adam": zo.ZOAdam,
        "hizoo": zo.HiZOO,
    }[method]
    opt = cls(model, lr=1e-6)
    return lambda: opt.step(lambda: loss().item())


def peak_rss() -> int:
    """This process's peak resident memory in bytes: Linux's VmHWM, the high-water mark of its own
    address space. ``ru_maxrss`` is not used where VmHWM exists: across ``fork`` + ``exec`` it keeps
    the parent's peak, so a child of a large parent would start from the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(args: argparse.Namespace) -> dict:
    import torch
    import torch.func  # noqa: F401

    import nograd.zo  # noqa: F401

    from ..core import gemm

    # torch.optim imports torch._dynamo lazily on first use (~70 MB): do it before the baseline,
    # in every process alike, so library imports are not counted as a step's memory
    w = torch.zeros(1, requires_grad=True)
    w.grad = torch.zeros(1)
    torch.optim.SGD([w], lr=0.1).step()

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = peak_rss()
    model, loss = _setup(args)
    step = _step_fn(args.child, model, loss)
    with gemm.linears_through(model):  # as `nograd train` runs its forwards
        step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss()
    params = sum(p.numel() for p in model.parameters())
    return {"added_bytes": peak - base, "params": params}


def _timing(args: argparse.Namespace) -> dict:
    import torch

    from ..core import gemm
    from ..zo import MeZO
    from .timing import interleaved_medians

    model, loss = _setup(args)
    infer = _step_fn("inference", model, loss)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    gaussian = MeZO(model, lr=1e-6)
    lowrank = MeZO(model, lr=1e-6, noise_rank=1)  # LOZO-style: E = a b^T for matrices
    table = MeZO(model, lr=1e-6, distribution="gaussian-table")
    counter = MeZO(model, lr=1e-6, distribution="gaussian-counter")
    counter.step(lambda: loss().item())  # compiles the noise kernel before the timing

    def two_forwards() -> None:
        infer()
        infer()
        sync()

    def step(opt):
        def run() -> None:
            opt.step(lambda: loss().item())
            sync()

        return run

    with gemm.linears_through(model):  # as `nograd train` runs its forwards
        t = interleaved_medians(
            {
                "two_forwards": two_forwards,
                "mezo": step(gaussian),
                "mezo_rank1": step(lowrank),
                "mezo_table": step(table),
                "mezo_counter": step(counter),
            },
            repeats=args.repeats,
        )
    return {
        "two_forwards_s": t["two_forwards"],
        "mezo_step_s": t["mezo"],
        "time_ratio": t["mezo"] / t["two_forwards"],
        "time_ratio_rank1_noise": t["mezo_rank1"] / t["two_forwards"],
        "time_ratio_table_noise": t["mezo_table"] / t["two_forwards"],
        "time_ratio_counter_noise": t["mezo_counter"] / t["two_forwards"],
    }


def _spawn(argv: list[str], child: str, module: str) -> dict:
    cmd = [sys.executable, "-m", module, *argv, "--child", child]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{module}: measuring {child} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_each(argv: list[str], methods_text: str, known: Sequence[str], module: str) -> dict[str, dict]:
    """Run ``python -m module ARGV --child M`` for inference and each method of ``methods_text``
    (comma-separated, from ``known``), each in a fresh process; their JSON results by method."""
    methods = [m for m in methods_text.split(",") if m]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(known)}")
    if "inference" not in methods:
        methods.insert(0, "inference")
    parent = [a for a in argv if a != "--json"]
    return {m: _spawn(parent, m, module) for m in methods}


def run(argv: list[str]) -> dict:
    args = _args(argv)
    measured = measure_each(argv, args.methods, ALL_METHODS, "nograd.bench.memory")
    inference = measured["inference"]["added_bytes"]
    if inference <= 0:
        raise ValueError(
            "bench memory: one forward of this model added no memory above the import peak; "
            "use a larger model (--n-embd, --n-layer) or batch"
        )
    out: dict = {
        "benchmark": "memory",
        "device": args.device,
        "params": measured["inference"]["params"],
        "batch_tokens": args.batch_size * args.block_size,
        "added_bytes": {m: r["added_bytes"] for m, r in measured.items()},
        "memory_ratios": {m: r["added_bytes"] / inference for m, r in measured.items() if m != "inference"},
    }
    if "mezo" in out["memory_ratios"]:
        out["memory_ratio"] = out["memory_ratios"]["mezo"]
    if not args.no_time:
        out.update(_spawn([a for a in argv if a != "--json"], "timing", "nograd.bench.memory"))
    return out


if __name__ == "__main__":
    a = _args(sys.argv[1:])
    result = _timing(a) if a.child == "timing" else _child(a)
    print(json.dumps(result))
