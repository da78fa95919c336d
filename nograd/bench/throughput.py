"""``nograd bench throughput``: a perturbed population's throughput against plain inference.

For each model, the same member-major batch of ``population * batch`` rows goes through

* plain batched inference of the unperturbed model (the yardstick),
* the batched low-rank population (EGGROLL: rank ``r`` factors per member, shared dense matmul),
* the naive full-rank population (dense per-member noise, as OpenAI-ES without the trick),

timed interleaved in one process. ``ratio`` = population member-tokens/s / inference tokens/s;
``update_ratio`` also counts rebuilding the ES estimate from the seeds (one full generation).

With ``--compile`` the low-rank population also runs through ``torch.compile``
(``BatchedPerturbation(compile=True)``) and is timed against plain inference compiled the same
way: ``compiled_ratio`` = compiled inference time / compiled population time, and
``compiled_vs_eager_ratio`` = eager inference time / compiled population time. The compiled
generation's time is split into drawing its noise (``compiled_draw_share``, the context opened
with no forward) and the forward (``compiled_forward_ratio`` = compiled inference time / the
rest). The first compiled call of each is timed apart (``compile_s``) and left out of the medians.

The engine computes its linear layers' shared product with this machine's faster float32 GEMM
(:mod:`nograd.core.gemm`: oneDNN on x86 CPUs that are not Intel's, whose MKL path is slow), and
its compiled CPU graph leaves GELU to ATen's kernel (:func:`nograd.core.compiling.gelus_through_aten`),
which plain inference of the module does not. So the bench also times plain inference through the
same kernels (``gemm`` names the GEMM): ``inference_gemm_speedup`` = plain inference's time / its
time with the engine's kernels, and ``same_gemm_ratio`` / ``compiled_same_gemm_ratio`` are the
ratios above against that like-for-like yardstick.
"""

from __future__ import annotations

import copy
import time
from contextlib import ExitStack

import torch
from torch import nn

from ..core import gemm
from ..core.compiling import gelus_through_aten
from ..core.engine import BatchedPerturbation, ParamSpace, accumulate, member_directions
from ..core.noise import SeededNoise
from ..models.gpt import GPT, GPTConfig
from . import BenchArgumentParser
from .timing import interleaved_medians


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10)
    )


def measure(
    model: nn.Module,
    inputs: torch.Tensor,
    population: int,
    rank: int,
    sigma: float,
    repeats: int,
    compile: bool = False,
) -> dict:
    rows = inputs.repeat(population, *([1] * (inputs.dim() - 1)))
    tokens = rows.numel() if rows.dtype == torch.long else rows.shape[0]
    noise = SeededNoise(0)
    low = ParamSpace(model, rank=rank)
    full = ParamSpace(model, rank=0)
    batched_low, batched_full = (
        BatchedPerturbation(model, low, noise),
        BatchedPerturbation(model, full, noise),
    )
    dirs = member_directions(range(population), sigma)
    gen = [0]

    def inference() -> None:
        with torch.no_grad():
            model(rows)

    # plain inference with the engine's own kernels (its GEMM: oneDNN's where MKL is slow; ATen's
    # GELU in a compiled CPU graph): like for like
    same_gemm = copy.deepcopy(model)
    routed = ExitStack()
    routed.enter_context(gemm.linears_through(same_gemm))
    routed.enter_context(gelus_through_aten(same_gemm))

    def inference_same_gemm() -> None:
        with torch.no_grad():
            same_gemm(rows)

    def population_low() -> None:
        gen[0] += 1  # fresh noise each call, as in training
        with batched_low.apply(gen[0], dirs):
            model(rows)

    def population_low_update() -> None:
        gen[0] += 1
        with batched_low.apply(gen[0], dirs):
            model(rows)
        accumulate(low, noise, gen[0], [(d, 1.0) for d in range(population // 2)])

    def population_full() -> None:
        gen[0] += 1
        with batched_full.apply(gen[0], dirs):
            model(rows)

    timed = {
        "inference": inference,
        "inference_same_gemm": inference_same_gemm,
        "low": population_low,
        "low_update": population_low_update,
        "full": population_full,
    }
    compiled: dict[str, float] = {}
    if compile:
        batched_compiled = BatchedPerturbation(model, low, noise, compile=True)
        plain_compiled = torch.compile(model)
        same_gemm_compiled = torch.compile(same_gemm)

        def inference_compiled() -> None:
            with torch.no_grad():
                plain_compiled(rows)

        def inference_same_gemm_compiled() -> None:
            with torch.no_grad():
                same_gemm_compiled(rows)

        def population_compiled() -> None:
            gen[0] += 1
            with batched_compiled.apply(gen[0], dirs):
                model(rows)

        def draw_compiled() -> None:  # the context alone: the generation's noise, no forward
            gen[0] += 1
            with batched_compiled.apply(gen[0], dirs):
                pass

        first_calls = (
            ("inference", inference_compiled),
            ("inference_same_gemm", inference_same_gemm_compiled),
            ("population", population_compiled),
        )
        for name, fn in first_calls:
            start = time.perf_counter()
            fn()  # compiles
            compiled[name] = time.perf_counter() - start
        timed.update(
            {
                "inference_compiled": inference_compiled,
                "inference_same_gemm_compiled": inference_same_gemm_compiled,
                "low_compiled": population_compiled,
                "draw": draw_compiled,
            }
        )
    try:
        t = interleaved_medians(timed, repeats=repeats)
    finally:
        routed.close()
    out = {
        "params": low.numel,
        "population": population,
        "rank": rank,
        "gemm": gemm.backend(),
        # what the engine's GEMM alone gives plain inference: torch's time / the engine kernel's
        "inference_gemm_speedup": t["inference"] / t["inference_same_gemm"],
        "same_gemm_ratio": t["inference_same_gemm"] / t["low"],
        "tokens_per_forward": tokens,
        "inference_tokens_per_s": tokens / t["inference"],
        "population_tokens_per_s": tokens / t["low"],
        "ratio": t["inference"] / t["low"],
        "update_ratio": t["inference"] / t["low_update"],
        "naive_tokens_per_s": tokens / t["full"],
        "naive_ratio": t["inference"] / t["full"],
    }
    if compile:
        out.update(
            {
                "compiled_ratio": t["inference_compiled"] / t["low_compiled"],
                "compiled_same_gemm_ratio": t["inference_same_gemm_compiled"] / t["low_compiled"],
                "compiled_vs_eager_ratio": t["inference"] / t["low_compiled"],
                # how the compiled generation's time splits: drawing its noise, and the forward
                "compiled_draw_share": t["draw"] / t["low_compiled"],
                "compiled_forward_ratio": t["inference_compiled"] / max(t["low_compiled"] - t["draw"], 1e-12),
                "compiled_population_tokens_per_s": tokens / t["low_compiled"],
                "compiled_inference_tokens_per_s": tokens / t["inference_compiled"],
                "compile_s": compiled,
            }
        )
    return out


def run(argv: list[str]) -> dict:
    p = BenchArgumentParser(prog="nograd bench throughput", description=__doc__.splitlines()[0])
    p.add_argument("--population", type=int, default=64)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--sigma", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=4, help="rows per member (GPT: sequences of --block tokens)")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", default="gpt,mlp", help="comma list of: gpt, mlp")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd population")
    p.add_argument("--json", action="store_true", help="(output is always JSON)")
    args = p.parse_args(argv)
    if args.population < 2 or args.population % 2:
        raise ValueError(f"--population must be an even number >= 2, got {args.population}")
    torch.manual_seed(0)
    results: dict[str, dict] = {}
    for name in args.models.split(","):
        if name == "gpt":
            cfg = GPTConfig(vocab_size=65, block_size=args.block, n_layer=4, n_head=4, n_embd=128)
            model = GPT(cfg).to(args.device).eval()
            inputs = torch.randint(0, 65, (args.batch, args.block), device=args.device)
        elif name == "mlp":
            model = _mlp(256).to(args.device).eval()
            inputs = torch.randn(args.batch * 16, 64, device=args.device)
        else:
            raise ValueError(f"unknown model {name!r} (choose gpt, mlp)")
        results[name] = measure(
            model, inputs, args.population, args.rank, args.sigma, args.repeats, compile=args.compile
        )
    out = {
        "benchmark": "throughput",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "models": results,
    }
    # headline: the char GPT when measured
    head = results.get("gpt") or next(iter(results.values()))
    out.update(
        {
            k: head[k]
            for k in (
                "ratio",
                "naive_ratio",
                "population_tokens_per_s",
                "inference_tokens_per_s",
                "population",
                "rank",
            )
        }
    )
    return out
