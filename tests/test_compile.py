"""The compiled population forward (``BatchedPerturbation(compile=True)``, ``--compile``): the same
losses as eager, compiled once, restored afterwards, eager with one warning when compiling fails."""

from __future__ import annotations

import warnings

import pytest
import torch
from _foundation import tiny_config
from torch import nn

from nograd.core.engine import BatchedPerturbation, ParamSpace, member_directions
from nograd.core.errors import UsageError
from nograd.core.noise import SeededNoise
from nograd.workbench import train


def _model() -> nn.Module:
    # an embedding, a norm with per-member gains, linears with biases, an activation: every kind
    # of layer the engine perturbs
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(20, 16), nn.LayerNorm(16), nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5)
    ).eval()


@pytest.mark.parametrize("rank", [1, 0])
def test_compiled_population_matches_eager_and_compiles_once(rank):
    model = _model()
    space, noise = ParamSpace(model, rank=rank), SeededNoise(3)
    eager = BatchedPerturbation(model, space, noise)
    compiled = BatchedPerturbation(model, space, noise, compile=True)
    ids = torch.randint(0, 20, (3, 4))
    population = 8
    rows = ids.repeat(population, 1)
    dirs = member_directions(range(population), 0.05)
    with torch.no_grad():
        plain = model(rows)
    from torch._dynamo.utils import counters

    first = frames = None
    for generation in range(3):
        with eager.apply(generation, dirs):
            want = model(rows)
        with compiled.apply(generation, dirs):
            got = model(rows)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, plain)  # the members really are perturbed
        first = compiled.compile_seconds if first is None else first
        assert compiled.compile_seconds == first  # timed once: the first generation paid for it
        frames = counters["frames"]["total"] if frames is None else frames
        assert counters["frames"]["total"] == frames  # fresh noise, the same graph: no recompile
    assert first is not None and first > 0
    assert "forward" not in vars(model) and all("forward" not in vars(m) for m in model)
    with torch.no_grad():
        torch.testing.assert_close(model(rows), plain)


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = _model()
    space, noise = ParamSpace(model, rank=1), SeededNoise(3)
    compiled = BatchedPerturbation(model, space, noise, compile=True)
    eager = BatchedPerturbation(model, space, noise)
    rows = torch.randint(0, 20, (4, 4)).repeat(4, 1)
    dirs = member_directions(range(4), 0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for generation in range(2):
            with compiled.apply(generation, dirs):
                got = model(rows)
            with eager.apply(generation, dirs):
                torch.testing.assert_close(got, model(rows))
    assert [str(w.message) for w in caught if "torch.compile failed" in str(w.message)] == [
        "torch.compile failed (RuntimeError: no C++ compiler here); using eager"
    ]
    assert compiled.compile is False


def test_train_with_compile_reports_the_compile_time(tmp_path):
    cfg = tiny_config(tmp_path, optimizer="eggroll", population=8, steps=2, eval_every=2, compile=True)
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["compile_s"] > 0
    with pytest.raises(UsageError, match="--compile applies to the batched population methods"):
        train(tiny_config(tmp_path, optimizer="adamw", compile=True))


def test_gelus_stay_one_aten_call_in_a_compiled_graph_and_are_restored():
    from nograd.core.compiling import gelus_through_aten

    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2), nn.GELU(approximate="tanh"))
    x = torch.randn(3, 4)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    forwards: dict = {}
    with torch.no_grad(), gelus_through_aten(model, forwards):
        got = torch.compile(model, backend=capture)(x)
        first = model[1].forward
    assert torch.equal(got, model(x))  # ATen's kernel: eager's numbers
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.nograd.gelu.default) == 2
    assert "forward" not in model[1].__dict__  # restored
    with gelus_through_aten(model, forwards):
        assert model[1].forward is first  # the same object in the next context: no new trace
