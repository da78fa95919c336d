"""``nograd bench distributed``: generations per second of one population on 1 and on N processes.

The same EGGROLL (or OpenAI-ES) population of the demo's char GPT is stepped by 1 and by N
processes (gloo on loopback, one torch thread each, each process on its own share of the
members), and every phase of a generation is timed on rank 0: the share's forward
(``evaluate``), the all-gather of the losses (``gather``) and the update that every rank
repeats from the seeds (``update``). Reported:

* ``generations_per_s`` for each process count and ``efficiency[N] = speed-up / N``;
* ``bytes_per_generation``: what each rank sent (the losses, through a ring all-gather), beside
  ``weights_bytes``: what sending the centre solution to each worker costs (EvoTorch's Ray
  actors receive O(d) numbers per generation);
* ``model``: the speed-up at 16, 256 and 1,024 workers predicted from the measured parts,
  ``t(N) = t_member * P / N + t_update + t_gather(N)``, with ``latency`` the measured
  2-process all-gather of the P losses (the ranks in step) and either a ring all-gather
  (gloo's: ``t_gather = (N - 1) latency``) or a tree / recursive doubling (MPI's and NCCL's
  for small messages: ``ceil(log2 N) latency``). With
  ``--lm`` the same for a 135M-parameter GPT (SmolLM2-135M's shape: 30 layers, 576 wide, 9
  heads, 49,152 tokens), whose per-member forward and update are measured here in one process.

The model ignores bandwidth (P losses are a few KB) and assumes one member per worker at most
(beyond that, ``t_member * P / N`` is floored at one member).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import BenchArgumentParser

WORKERS = (16, 256, 1024)


def _parser() -> argparse.ArgumentParser:
    p = BenchArgumentParser(prog="nograd bench distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=("eggroll", "openai-es"), default="eggroll")
    p.add_argument("--population", type=int, default=256, help="members per generation (default: 256)")
    p.add_argument("--procs", type=int, default=2, help="the process count to compare with one (default: 2)")
    p.add_argument("--generations", type=int, default=30, help="timed generations (default: 30)")
    p.add_argument("--warmup", type=int, default=5, minimum=0, help="untimed generations first (default: 5)")
    p.add_argument("--n-layer", type=int, default=1)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="rows per member (default: 8)")
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--lm", action="store_true", help="also model a 135M-parameter LM (measured in 1 process)")
    p.add_argument(
        "--lm-members", type=int, default=4, help="members timed for the LM's forward (default: 4)"
    )
    p.add_argument("--json", action="store_true", help="print JSON (the default output anyway)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run as one rank, write results here
    return p


def _check(args: argparse.Namespace) -> None:
    """What the parser's checks by class (whole numbers >= 1, --warmup >= 0) leave to check."""
    if args.population % 2 or args.population // 2 < args.procs:
        raise ValueError("--population must be even, with at least one antithetic pair per process")
    if args.n_embd % args.n_head:
        raise ValueError("--n-embd must be divisible by --n-head")
    if args.procs > (os.cpu_count() or 1):
        raise ValueError(f"--procs {args.procs} is more than this machine's {os.cpu_count()} cores")


def _build(args: argparse.Namespace, process_group, n_layer, n_embd, n_head, vocab, population):
    from ..models.gpt import GPT, GPTConfig
    from ..strategies.eggroll import EGGROLL
    from ..strategies.openai_es import OpenAIES

    torch.manual_seed(0)
    model = GPT(
        GPTConfig(vocab_size=vocab, block_size=args.block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    )
    cls, extra = (EGGROLL, {"rank": 1}) if args.method == "eggroll" else (OpenAIES, {})
    es = cls(model, sigma=0.01, population=population, lr=1e-3, seed=0, process_group=process_group, **extra)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(vocab, (args.batch_size, args.block_size), generator=g)
    y = torch.randint(vocab, (args.batch_size, args.block_size), generator=g)
    return model, es, x, y


def _loss(model, x, y):
    from ..tasks.shakespeare import per_example_loss

    return per_example_loss(model, x, y)


def _worker(args: argparse.Namespace) -> None:
    """One rank: time each phase of ``generations`` generations; rank 0 writes the medians."""
    import torch.distributed as dist

    from ..core.allocator import retain_freed_memory

    retain_freed_memory()  # as ES training does
    torch.set_num_threads(1)
    group = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    model, es, x, y = _build(args, group, args.n_layer, args.n_embd, args.n_head, args.vocab, args.population)
    phases: dict[str, list[float]] = {"evaluate": [], "gather": [], "update": [], "generation": []}
    sent = []
    for i in range(args.warmup + args.generations):
        before = es.collective.bytes_sent
        t0 = time.perf_counter()
        with torch.no_grad():
            local = es.evaluate_share(_loss, x, y)
        t1 = time.perf_counter()
        losses = es.collective.gather(local, es.population, 2 if es.antithetic else 1)
        t2 = time.perf_counter()
        es.update(losses)
        t3 = time.perf_counter()
        if i >= args.warmup:
            for name, dt in (
                ("evaluate", t1 - t0),
                ("gather", t2 - t1),
                ("update", t3 - t2),
                ("generation", t3 - t0),
            ):
                phases[name].append(dt)
            sent.append(es.collective.bytes_sent - before)
    weights = [p.detach().clone() for p in model.parameters()]
    es.collective.check_same(weights)  # the processes ended with the same weights
    # the all-gather alone, the ranks in step (the gather phase above also waits for the slower rank)
    latency = []
    for _ in range(50 if group is not None else 0):
        es.collective.barrier()
        t0 = time.perf_counter()
        es.collective.gather(local, es.population, 2 if es.antithetic else 1)
        latency.append(time.perf_counter() - t0)
    if es.collective.rank == 0:
        result = {name: statistics.median(ts) for name, ts in phases.items()}
        result["latency"] = statistics.median(latency) if latency else 0.0
        result["bytes_per_generation"] = statistics.median(sent) if sent else 0
        result["params"] = sum(p.numel() for p in model.parameters())
        Path(args.worker).write_text(json.dumps(result))
    if group is not None:
        es.collective.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv: list[str], procs: int, out: Path) -> dict:
    port = _free_port()
    children = []
    for rank in range(procs):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(procs),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, "-m", "nograd.bench.distributed", *argv, "--worker", str(out)]
        children.append(subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True))
    errors = [c.communicate(timeout=1800)[1] for c in children]
    if any(c.returncode for c in children):
        raise RuntimeError(
            "a benchmark process failed: " + next(e for e, c in zip(errors, children) if c.returncode)[-500:]
        )
    return json.loads(out.read_text())


def _lm_parts(args: argparse.Namespace) -> dict:
    """Per-member forward and update seconds of a 135M-parameter GPT, in this process (one thread)."""
    torch.set_num_threads(1)
    model, es, x, y = _build(args, None, 30, 576, 9, 49152, args.lm_members * 2)
    with torch.no_grad():
        es.evaluate_share(_loss, x, y)  # warm-up
        t0 = time.perf_counter()
        es.evaluate_share(_loss, x, y)
        t_member = (time.perf_counter() - t0) / es.population
    _, big, _, _ = _build(args, None, 30, 576, 9, 49152, args.population)
    del model, es
    big.update(torch.randn(args.population))  # warm-up
    t0 = time.perf_counter()
    big.update(torch.randn(args.population))
    t_update = time.perf_counter() - t0
    return {
        "params": sum(p.numel() for p in big.model.parameters()),
        "t_member": t_member,
        "t_update": t_update,
    }


def _model(t_member: float, t_update: float, latency: float, population: int) -> dict[str, dict[str, float]]:
    t1 = t_member * population + t_update
    out: dict[str, dict[str, float]] = {"ring": {}, "tree": {}}
    for n in WORKERS:
        compute = t_member * max(population / n, 1.0) + t_update
        out["ring"][str(n)] = round(t1 / (compute + (n - 1) * latency), 2)
        out["tree"][str(n)] = round(t1 / (compute + math.ceil(math.log2(n)) * latency), 2)
    return out


def run(argv: list[str]) -> dict:
    args = _parser().parse_args(argv)
    if args.worker:
        _worker(args)
        return {}
    _check(args)
    child_argv = [a for a in argv if a not in ("--json", "--lm")]
    with tempfile.TemporaryDirectory() as tmp:
        one = _launch(child_argv, 1, Path(tmp) / "one.json")
        many = _launch(child_argv, args.procs, Path(tmp) / "many.json")
    speedup = one["generation"] / many["generation"]
    t_member = one["evaluate"] / args.population
    result = {
        "method": args.method,
        "population": args.population,
        "params": one["params"],
        "procs": [1, args.procs],
        "generations_per_s": {
            "1": round(1 / one["generation"], 2),
            str(args.procs): round(1 / many["generation"], 2),
        },
        "speedup": round(speedup, 3),
        "efficiency": round(speedup / args.procs, 3),
        "phases_s": {
            "1": {k: one[k] for k in ("evaluate", "gather", "update")},
            str(args.procs): {k: many[k] for k in ("evaluate", "gather", "update")},
        },
        "bytes_per_generation": many["bytes_per_generation"],
        "weights_bytes": one["params"] * 4,
        "model": {
            "t_member_s": t_member,
            "t_update_s": one["update"],
            "gather_latency_s": many["latency"],
            "speedup_at": _model(t_member, one["update"], many["latency"], args.population),
        },
    }
    if args.lm:
        lm = _lm_parts(args)
        result["lm_135m"] = {
            **lm,
            "speedup_at": _model(lm["t_member"], lm["t_update"], many["latency"], args.population),
        }
    return result


if __name__ == "__main__":
    out = run(sys.argv[1:])
    if out:
        print(json.dumps(out, indent=2))
