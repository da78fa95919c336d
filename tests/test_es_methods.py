"""ES methods in the trainer registry, and the `es` benchmark."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from nograd.core.errors import UsageError
from nograd.models.gpt import GPT, GPTConfig
from nograd.tasks.shakespeare import per_example_loss
from nograd.workbench import TrainConfig
from nograd.workbench.methods_es import ES_DEFAULTS, ES_METHODS
from nograd.workbench.registry import get_method, load_methods

pytestmark = pytest.mark.usefixtures("one_thread")


NAMES = ["openai-es", "eggroll", "pgpe", "snes", "sep-cma", "lm-ma-es", "rm-es", "cma", "cem", "ga", "nres"]


def tiny_gpt(seed: int = 0, n_embd: int = 8) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=n_embd))


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 11, (3, 8), generator=g)
    return x, (x + 1) % 11


def cfg_for(name: str, **kw) -> TrainConfig:
    info = get_method(name)
    base = {"optimizer": name, "lr": info.default_lr, "population": 8, "seed": 1}
    base.update(kw)
    return TrainConfig(**base)


def test_all_es_methods_registered_forward_only():
    methods = load_methods()
    assert set(NAMES) == set(ES_METHODS)
    for name in NAMES:
        assert methods[name].forward_only, name
        assert methods[name].summary


@pytest.mark.parametrize("name", NAMES)
def test_method_steps_counts_tokens_and_resumes_identically(name):
    model = tiny_gpt()
    info = get_method(name)
    method = info.build(model, per_example_loss, cfg_for(name))
    x, y = batch(0)
    r = method.step(x, y, 1.0)
    assert r.forward_tokens == 8 * x.numel()
    assert torch.isfinite(torch.tensor(r.loss))
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)  # checkpoints hold tensors and plain values only
    saved_model = copy.deepcopy(model.state_dict())
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    x2, y2 = batch(1)
    method.step(x2, y2, 0.5)
    other = tiny_gpt(seed=5)
    other.load_state_dict(saved_model)
    method2 = info.build(other, per_example_loss, cfg_for(name))
    method2.load_state_dict(saved)
    method2.step(x2, y2, 0.5)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q), name


def test_eggroll_defaults_and_options():
    d = ES_DEFAULTS["eggroll"]
    assert d["population"] >= 128 and 1 <= d["rank"] <= 4 and 1e-2 <= d["sigma"] <= 1e-1
    model = tiny_gpt()
    cfg = cfg_for("eggroll", rank=1, outer="muon", opts={"group_size": "2", "mode": "inplace"})
    method = get_method("eggroll").build(model, per_example_loss, cfg)
    assert method.es.rank == 1 and method.es.group_size == 2 and method.es.mode == "inplace"
    assert len(method.es.optimizers) == 2  # Muon on hidden matrices + AdamW on the rest
    method.step(*batch(), 1.0)


def test_eggroll_reduces_loss_on_a_fixed_batch():
    model = tiny_gpt(n_embd=16)
    x, y = batch(0)
    with torch.no_grad():
        start = float(per_example_loss(model, x, y).mean())
    cfg = cfg_for("eggroll", population=32, lr=1e-2, sigma=0.05)
    method = get_method("eggroll").build(model, per_example_loss, cfg)
    for _ in range(30):
        method.step(x, y, 1.0)
    with torch.no_grad():
        end = float(per_example_loss(model, x, y).mean())
    assert end < start - 0.3, (start, end)


@pytest.mark.parametrize(
    ("name", "bad"),
    [("openai-es", "uniform"), ("eggroll", "uniform"), ("snes", "rademacher")],
)
def test_table_noise_option_reaches_the_strategy(name: str, bad: str):
    model = tiny_gpt()
    method = get_method(name).build(model, per_example_loss, cfg_for(name, opts={"noise": "gaussian-table"}))
    es = method.es if hasattr(method, "es") else method.adapter.strategy
    assert es.noise.distribution == "gaussian-table"
    method.step(*batch(), 1.0)
    with pytest.raises(UsageError, match="noise"):  # flat strategies take Gaussian noise only
        get_method(name).build(model, per_example_loss, cfg_for(name, opts={"noise": bad}))


def test_lm_ma_es_sampling_option_reaches_the_strategy():
    """``--opt sampling=paper|direct`` picks LM-MA-ES's way of drawing its samples; float32 weights
    draw directly by default."""
    for opts, direct in (({}, True), ({"sampling": "paper"}, False), ({"sampling": "direct"}, True)):
        method = get_method("lm-ma-es").build(tiny_gpt(), per_example_loss, cfg_for("lm-ma-es", opts=opts))
        assert method.adapter.strategy.direct_sampling() is direct
        method.step(*batch(), 1.0)
    with pytest.raises(UsageError, match="sampling"):
        get_method("lm-ma-es").build(
            tiny_gpt(), per_example_loss, cfg_for("lm-ma-es", opts={"sampling": "fast"})
        )


def test_bad_options_are_usage_errors():
    model = tiny_gpt()
    with pytest.raises(UsageError):
        get_method("eggroll").build(model, per_example_loss, cfg_for("eggroll", opts={"nope": "1"}))
    with pytest.raises(UsageError):
        get_method("eggroll").build(model, per_example_loss, cfg_for("eggroll", population=7))
    with pytest.raises(UsageError):
        get_method("openai-es").build(model, per_example_loss, cfg_for("openai-es", rank=2))
    with pytest.raises(UsageError):
        get_method("snes").build(model, per_example_loss, cfg_for("snes", opts={"eta_mu": "abc"}))
    big = tiny_gpt(n_embd=32)
    with pytest.raises(UsageError, match="max_dim"):
        get_method("cma").build(big, per_example_loss, cfg_for("cma"))


def test_es_bench_reports_ratios():
    from nograd.bench import get

    out = get("es")(
        ["--dim", "3000", "--population", "8", "--repeats", "1", "--strategies", "eggroll,snes,cma,openai-es"]
        + ["--table"]
    )
    assert out["dim"] > 2000
    assert set(out["strategies"]) == {
        "eggroll",
        "snes",
        "snes (gaussian-table)",
        "openai-es",
        "openai-es (gaussian-table)",
    }
    assert "cma" in out["skipped"]
    for r in out["strategies"].values():
        assert r["ratio"] > 0 and r["seconds_per_generation"] > 0


@pytest.mark.parametrize("outer", ["adam", "sgd"])
def test_outer_names_accepted_by_the_config(outer: str) -> None:
    TrainConfig(optimizer="eggroll", outer=outer).validate()


def test_unknown_outer_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--outer must be one of adamw, adam, sgd, muon, got 'lion'"):
        TrainConfig(optimizer="eggroll", outer="lion").validate()
