"""Trajectory logs: replaying a run from its initial weights is bit-exact, with no forward pass."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nograd.core.errors import UsageError
from nograd.models.gpt import GPT, GPTConfig
from nograd.workbench.checkpoint import load_checkpoint, save_checkpoint
from nograd.workbench.replay import replay_command
from nograd.zo import ForwardGradient, HiZOO, MeZO, ZOAdam, ZOMomentum, ZOSign, read_trajectory, replay

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)


def groups(model: nn.Module) -> list[dict]:
    """Two groups with their own lr and eps, as a user might set them."""
    return [
        {"params": list(model[0].parameters()) + list(model[1].parameters()), "eps": 2e-3},
        {"params": list(model[3].parameters()), "lr": 5e-3},
    ]


CONFIGS = [
    ("mezo", lambda m, **kw: MeZO(m, lr=1e-2, directions=2, weight_decay=0.1, **kw)),
    ("mezo-groups", lambda m, **kw: MeZO(groups(m), lr=1e-2, directions=3, one_sided=True, **kw)),
    (
        "mezo-lowrank",
        lambda m, **kw: MeZO(m, lr=1e-2, directions=2, noise_rank=2, distribution="rademacher", **kw),
    ),
    ("sign", lambda m, **kw: ZOSign(m, lr=1e-3, directions=2, weight_decay=0.1, **kw)),
    ("momentum", lambda m, **kw: ZOMomentum(m, lr=1e-2, weight_decay=0.1, **kw)),
    ("momentum-replay", lambda m, **kw: ZOMomentum(groups(m), lr=1e-2, buffer="replay", window=4, **kw)),
    ("adam", lambda m, **kw: ZOAdam(m, lr=1e-2, directions=2, weight_decay=0.1, **kw)),
    ("hizoo", lambda m, **kw: HiZOO(groups(m), lr=1e-2, directions=2, hessian_smooth=0.1, **kw)),
    ("forward-grad", lambda m, **kw: ForwardGradient(m, lr=1e-2, tangents=2, weight_decay=0.1, **kw)),
]


def train(make, steps: int, log_path=None, schedule: bool = True, nan_at: int | None = None):
    model = mlp()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data()
    opt = make(model, seed=11, log_path=log_path)
    base = [g["lr"] for g in opt.param_groups]
    for t in range(steps):
        if schedule:  # a changing lr must be logged and replayed
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * (1 - t / (2 * steps))
        poison = t == nan_at
        if isinstance(opt, ForwardGradient):
            fn = lambda m, p=poison: F.mse_loss(m(x), y) * (float("nan") if p else 1.0)  # noqa: E731
        else:
            fn = lambda p=poison: F.mse_loss(model(x), y) * (float("nan") if p else 1.0)  # noqa: E731
        try:
            opt.step(fn)
        except ValueError:
            assert poison
    return model, init, opt


@pytest.mark.parametrize("name,make", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_replay_is_bit_exact(tmp_path, name, make):
    log = tmp_path / "trajectory.jsonl"
    model, init, opt = train(make, steps=12, log_path=log, nan_at=5)
    fresh = mlp()
    fresh.load_state_dict(init)

    def no_forward(*args):
        raise AssertionError("replay ran a forward pass")

    handle = nn.modules.module.register_module_forward_pre_hook(no_forward)
    try:
        replayed = replay(fresh, log)
    finally:
        handle.remove()
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert replayed.step_count == opt.step_count == 12
    # the rebuilt optimizer state is the trained one, so training could go on from it
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, replayed.state[q][key]), key


def test_log_format(tmp_path):
    log = tmp_path / "t.jsonl"
    train(CONFIGS[1][1], steps=3, log_path=log, nan_at=1)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    header, records = lines[0], lines[1:]
    assert header["format"] == "nograd-zo-trajectory" and header["optimizer"] == "MeZO"
    assert header["kwargs"] == {
        "seed": 11,
        "distribution": "gaussian",
        "noise_rank": 0,
        "directions": 3,
        "one_sided": True,
    }
    assert header["names"] is None  # groups of bare tensors; a module (or named_parameters) gives names
    assert MeZO(mlp()).trajectory_header()["names"] == [
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
    ]
    assert header["group_of"] == [0, 0, 0, 0, 1, 1]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1] == {"step": 1, "seed": 11, "skipped": True}
    r = records[0]
    assert r["directions"] == [0, 1, 2] and len(r["proj_grads"]) == 2
    assert r["proj_grads"][0][0] * 2e-3 == pytest.approx(r["proj_grads"][1][0] * 1e-3)  # diff / eps_j
    assert r["groups"][0]["eps"] == 2e-3 and r["groups"][1]["lr"] == 5e-3
    assert r["forwards"] == 4  # L(theta) + 3 directions


def test_trajectory_callback_and_resumed_log(tmp_path):
    """Records from a callback replay too; a resumed run's re-done steps supersede the old ones."""
    make = CONFIGS[6][1]  # adam: stateful
    model, init, opt = train(make, steps=6, schedule=False)
    records: list[dict] = []
    model2 = mlp()
    x, y = data()
    opt2 = make(model2, seed=11, trajectory=records.append)
    for _ in range(4):
        opt2.step(lambda: F.mse_loss(model2(x), y))
    saved = copy.deepcopy((model2.state_dict(), opt2.state_dict()))  # a checkpoint on disk
    for _ in range(2):  # steps 4, 5 that a crash loses...
        opt2.step(lambda: F.mse_loss(model2(x) * 2, y))
    model2.load_state_dict(saved[0])  # ... so the run resumes from step 4
    opt2.load_state_dict(saved[1])
    for _ in range(2):
        opt2.step(lambda: F.mse_loss(model2(x), y))
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5, 4, 5]
    header, kept = read_trajectory([opt2.trajectory_header(), *records])
    assert [r["step"] for r in kept] == [0, 1, 2, 3, 4, 5]
    fresh = mlp()
    fresh.load_state_dict(init)
    replay(fresh, [opt2.trajectory_header(), *records])
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model2.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_replay_errors():
    model, init, opt = train(CONFIGS[0][1], steps=2)
    with pytest.raises(ValueError, match="header"):
        replay(mlp(), [{"step": 0, "seed": 11}])
    with pytest.raises(ValueError, match="jumps"):
        read_trajectory([{"step": 0}, {"step": 2}])
    with pytest.raises(ValueError, match="shape"):
        replay(
            nn.Sequential(nn.Linear(4, 9), nn.LayerNorm(9), nn.Tanh(), nn.Linear(9, 1)),
            [opt.trajectory_header()],
        )


def test_replay_command_on_checkpoints_with_tied_weights(tmp_path):
    """The CLI entry point: nograd checkpoint in, nograd checkpoint out; tied tensors stay tied."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(cfg)
    save_checkpoint(tmp_path / "init.pt", {"model": model.state_dict(), "model_config": vars(cfg), "step": 0})
    torch.save(model.state_dict(), tmp_path / "init_plain.pt")
    idx, tgt = torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))
    opt = ZOAdam(model, lr=1e-2, directions=2, log_path=tmp_path / "t.jsonl")
    for _ in range(4):
        opt.step(lambda: F.cross_entropy(model(idx).reshape(-1, 11), tgt.reshape(-1)))

    summary = replay_command(tmp_path / "init.pt", tmp_path / "t.jsonl", tmp_path / "final.pt")
    assert summary["steps"] == 4 and summary["optimizer"] == "ZOAdam"
    out = load_checkpoint(tmp_path / "final.pt")
    assert out["replayed_steps"] == 4 and out["model_config"] == vars(cfg)
    trained = model.state_dict()
    for k, v in out["model"].items():
        assert torch.equal(v, trained[k]), k
    assert torch.equal(out["model"]["lm_head.weight"], trained["transformer.wte.weight"])

    replay_command(tmp_path / "init_plain.pt", tmp_path / "t.jsonl", tmp_path / "final_plain.pt")
    plain = torch.load(tmp_path / "final_plain.pt", weights_only=True)
    for k, v in plain.items():
        assert torch.equal(v, trained[k]), k

    with pytest.raises(UsageError, match="does not exist"):
        replay_command(tmp_path / "missing.pt", tmp_path / "t.jsonl", tmp_path / "x.pt")
    bare = tmp_path / "bare.jsonl"
    w = torch.zeros(3, requires_grad=True)
    MeZO([w], log_path=bare).step(lambda: float(w.sum()))
    with pytest.raises(UsageError, match="name"):
        replay_command(tmp_path / "init.pt", bare, tmp_path / "x.pt")
