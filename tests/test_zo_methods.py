"""The zeroth-order optimizers as trainer methods (nograd.workbench.methods_zo)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import nograd.workbench.methods_zo  # noqa: F401  (registers the methods)
from nograd.core.errors import UsageError
from nograd.models.gpt import GPT, GPTConfig
from nograd.tasks.shakespeare import per_example_loss
from nograd.workbench import TrainConfig
from nograd.workbench.registry import METHODS, StepResult, load_methods
from nograd.workbench.replay import replay_command

NAMES = ["mezo", "zo-sign", "zo-momentum", "zo-adam", "hizoo", "forward-grad"]
FORWARDS = {"mezo": 4, "zo-sign": 4, "zo-momentum": 4, "zo-adam": 4, "hizoo": 5, "forward-grad": 6}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (2, 8), generator=g), torch.randint(0, 11, (2, 8), generator=g)


def build(name: str, model, **cfg):
    cfg = TrainConfig(optimizer=name, lr=cfg.pop("lr", 1e-3), directions=2, **cfg)
    return METHODS[name].build(model, per_example_loss, cfg)


def test_registered_as_forward_only():
    methods = load_methods()
    for name in NAMES:
        assert name in methods and methods[name].forward_only, name
        assert methods[name].default_lr > 0


@pytest.mark.parametrize("name", NAMES)
def test_step_reports_loss_and_forward_tokens(name):
    model = tiny_gpt()
    before = [p.detach().clone() for p in model.parameters()]
    method = build(name, model)
    x, y = batch()
    first = method.step(x, y, 0.5)
    assert isinstance(first, StepResult)
    # the first SPSA step runs one unperturbed discovery forward (HiZOO needs L(theta) anyway)
    discovery = 1 if name in ("mezo", "zo-sign", "zo-momentum", "zo-adam") else 0
    assert first.forward_tokens == (FORWARDS[name] + discovery) * x.numel()
    result = method.step(x, y, 0.5)
    assert math.isfinite(result.loss) and result.info["nonfinite"] == 0.0
    assert result.forward_tokens == FORWARDS[name] * x.numel()
    assert method.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(getattr(m, "attention", "sdpa") == "sdpa" for m in model.modules())


@pytest.mark.parametrize("name", ["mezo", "zo-momentum", "hizoo", "forward-grad"])
def test_state_dict_round_trip(name):
    model = tiny_gpt()
    method = build(name, model)
    for t in range(2):
        method.step(*batch(t), 1.0)
    saved = copy.deepcopy((model.state_dict(), method.state_dict()))
    losses = [method.step(*batch(t), 1.0).loss for t in (2, 3)]
    model_b = tiny_gpt()
    model_b.load_state_dict(saved[0])
    method_b = build(name, model_b, seed=99)
    method_b.load_state_dict(saved[1])
    assert [method_b.step(*batch(t), 1.0).loss for t in (2, 3)] == losses
    for a, b in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_options_are_checked():
    model = tiny_gpt()
    with pytest.raises(UsageError, match="unknown --opt"):
        build("mezo", model, opts={"momentum": "0.9"})
    with pytest.raises(UsageError, match="eps"):
        build("mezo", model, eps=-1.0)
    with pytest.raises(UsageError, match="buffer"):
        build("zo-momentum", model, opts={"buffer": "half"})
    with pytest.raises(UsageError, match="dense"):
        build("hizoo", model, rank=2)
    method = build("zo-momentum", model, opts={"buffer": "replay", "window": "4", "momentum": "0.5"})
    assert method.optimizer.buffer == "replay" and method.optimizer.param_groups[0]["momentum"] == 0.5


def test_nan_loss_skips_the_step():
    model = tiny_gpt()
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(optimizer="mezo", lr=1e-3, directions=2)
    method = METHODS["mezo"].build(model, lambda m, x, y: per_example_loss(m, x, y) * math.nan, cfg)
    result = method.step(*batch(), 1.0)
    assert math.isnan(result.loss) and result.info["skipped"] == 1.0 and result.info["nonfinite"] == 2.0
    assert result.forward_tokens == 5 * 16  # a discovery forward, then 2 directions x 2
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_trajectory_option_and_replay(tmp_path):
    model = tiny_gpt()
    method = build("zo-adam", model, out=str(tmp_path), opts={"trajectory": "auto"})
    for t in range(3):
        method.step(*batch(t), 1.0 - 0.2 * t)
    log = tmp_path / "trajectory.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0]["optimizer"] == "ZOAdam" and [r["step"] for r in lines[1:]] == [0, 1, 2]
    assert [r["groups"][0]["lr"] for r in lines[1:]] == pytest.approx([1e-3, 8e-4, 6e-4])
    replay_command(str(log) + ".init.pt", log, tmp_path / "final.pt")
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(final[k], v), k
