"""The gradient optimizers of the references: each against its paper's update written out by
hand, a convergence test on a small problem, a state_dict round trip, and the trainer."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from _foundation import tiny_config

from nograd.core.errors import UsageError
from nograd.optim import AGD, MFAC, AdamAtan2, SophiaG, agd_groups
from nograd.workbench import train
from nograd.workbench.checkpoint import load_checkpoint
from nograd.workbench.registry import get_method


def _grads(seed: int, *shapes: int) -> torch.Tensor:
    return torch.randn(*shapes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- one step against the paper


def test_adam_atan2_three_steps_by_hand():
    lr, (b1, b2), wd, a, b = 0.01, (0.9, 0.99), 0.1, 1.27, 2.0
    w = torch.nn.Parameter(_grads(0, 5))
    opt = AdamAtan2([w], lr=lr, betas=(b1, b2), weight_decay=wd, a=a, b=b)
    theta, m, v = w.detach().clone(), torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for t in range(1, 4):
        g = _grads(t, 5)
        w.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        theta = theta * (1 - lr * wd) - lr * a * torch.atan2(m_hat, b * v_hat.sqrt())
    torch.testing.assert_close(w.detach(), theta)
    # the step is bounded by lr * a * pi / 2 whatever the gradient's scale, and has no epsilon
    w.grad = torch.full((5,), 1e30, dtype=torch.float64)
    before = w.detach().clone()
    opt.step()
    assert ((w.detach() - before * (1 - lr * wd)).abs() <= lr * a * math.pi / 2 + 1e-12).all()


def test_sophiag_step_and_hessian_by_hand():
    lr, (b1, b2), rho, wd, bs = 0.05, (0.965, 0.99), 0.04, 0.2, 64
    w = torch.nn.Parameter(_grads(0, 6))
    opt = SophiaG([w], lr=lr, betas=(b1, b2), rho=rho, weight_decay=wd, bs=bs)
    theta, m, h = w.detach().clone(), torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for t in range(1, 5):
        g = _grads(t, 6)
        w.grad = g.clone()
        opt.step()
        theta = theta * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        theta = theta - lr * m.sign() * torch.clamp(m.abs() / (rho * bs * h + 1e-15), max=1.0)
        if t % 2 == 0:  # a Hessian refresh every 2 steps, from a "sampled-label" gradient
            g_hat = _grads(100 + t, 6) * 0.1
            w.grad = g_hat.clone()
            opt.update_hessian()
            h = b2 * h + (1 - b2) * g_hat * g_hat
    torch.testing.assert_close(w.detach(), theta)
    torch.testing.assert_close(opt.state[w]["hessian"], h)
    assert 0.0 <= opt.unclipped_fraction() <= 1.0


def test_agd_step_by_hand():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8, bias=False), torch.nn.ReLU(), torch.nn.Linear(8, 3, bias=False)
    ).double()
    opt = AGD(net.parameters(), gain=0.5)
    opt.init_weights()
    before = [p.detach().clone() for p in net.parameters()]
    x, y = _grads(1, 16, 4), _grads(2, 16, 3)
    F.mse_loss(net(x), y).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    eta = opt.step()
    scales = [math.sqrt(8 / 4), math.sqrt(3 / 8)]
    G = sum(s * float(g.norm()) for s, g in zip(scales, grads)) / 2
    expected_eta = math.log((1 + math.sqrt(1 + 4 * G)) / 2)
    assert eta == pytest.approx(expected_eta)
    for p, w0, g, s in zip(net.parameters(), before, grads, scales):
        torch.testing.assert_close(p.detach(), w0 - 0.5 * expected_eta / 2 * s * g / g.norm())


def test_agd_refuses_vectors_and_splits_a_gpt():
    with pytest.raises(ValueError, match="bias or a norm gain"):
        AGD(torch.nn.Linear(3, 2).parameters())
    from nograd.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11))
    groups, vectors = agd_groups(model)
    assert all(p.dim() == 1 for p in vectors) and len(vectors) == 3  # two block norms and ln_f
    embeddings = next(g for g in groups if g.get("transpose"))["params"]
    assert model.transformer.wte.weight in embeddings  # the tied head counted once, as the embedding
    n = sum(len(g["params"]) for g in groups)
    assert n + len(vectors) == len(list(model.parameters()))


def _dense_inverse_fisher(window: torch.Tensor, damp: float) -> torch.Tensor:
    m, d = window.shape
    return torch.linalg.inv(damp * torch.eye(d, dtype=window.dtype) + window.T @ window / m)


def test_mfac_product_equals_the_dense_inverse_fisher_after_the_window_wraps():
    d, m, damp, lr, wd = 12, 4, 1e-2, 0.1, 0.05
    w = torch.nn.Parameter(_grads(0, d))
    opt = MFAC([w], lr=lr, weight_decay=wd, ngrads=m, damp=damp)
    window: list[torch.Tensor] = []
    theta = w.detach().clone()
    for t in range(7):  # more steps than the window holds
        g = _grads(t + 1, d)
        w.grad = g.clone()
        opt.step()
        g_wd = g + wd * theta
        window = (window + [g_wd])[-m:]
        rows = torch.stack(window + [torch.zeros(d, dtype=torch.float64)] * (m - len(window)))
        theta = theta - lr * _dense_inverse_fisher(rows, damp) @ g_wd
        torch.testing.assert_close(w.detach(), theta)
    x = _grads(99, d)
    torch.testing.assert_close(
        opt.inverse_fisher_product(x), _dense_inverse_fisher(torch.stack(window), damp) @ x
    )


def test_mfac_momentum_after_preconditioning():
    d, m, damp, lr, mu = 6, 3, 1e-1, 0.1, 0.9
    w = torch.nn.Parameter(_grads(0, d))
    opt = MFAC([w], lr=lr, momentum=mu, ngrads=m, damp=damp)
    theta, v, window = w.detach().clone(), torch.zeros(d, dtype=torch.float64), []
    for t in range(4):
        g = _grads(t + 1, d)
        w.grad = g.clone()
        opt.step()
        window = (window + [g])[-m:]
        rows = torch.stack(window + [torch.zeros(d, dtype=torch.float64)] * (m - len(window)))
        v = mu * v + (1 - mu) * _dense_inverse_fisher(rows, damp) @ g
        theta = theta - lr * v
    torch.testing.assert_close(w.detach(), theta)


# ---------------------------------------------------------------- convergence on a small problem


def _softmax_regression(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 10, generator=gen)
    y = (x @ torch.randn(10, 3, generator=gen)).argmax(1)
    torch.manual_seed(seed)
    return x, y, torch.nn.Linear(10, 3, bias=False)


@pytest.mark.parametrize("name", ["adam-atan2", "sophiag", "mfac"])
def test_convergence_on_softmax_regression(name):
    x, y, model = _softmax_regression()
    start = F.cross_entropy(model(x), y).item()
    opt = {
        "adam-atan2": lambda p: AdamAtan2(p, lr=0.05),
        "sophiag": lambda p: SophiaG(p, lr=0.05, rho=0.04, weight_decay=0.0, bs=x.shape[0]),
        "mfac": lambda p: MFAC(p, lr=0.01, ngrads=16, damp=1e-3),
    }[name](model.parameters())
    gen = torch.Generator().manual_seed(1)
    for step in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if name == "sophiag" and step % 10 == 9:  # GNB: labels drawn from the model's softmax
            opt.zero_grad()
            with torch.no_grad():
                sampled = torch.multinomial(torch.softmax(model(x), 1), 1, generator=gen).view(-1)
            F.cross_entropy(model(x), sampled).backward()
            opt.update_hessian()
    end = F.cross_entropy(model(x), y).item()
    assert end < 0.3 * start, (start, end)


def test_agd_convergence_without_a_learning_rate():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=gen)
    target = torch.tanh(x @ torch.randn(8, 4, generator=gen))
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 32, bias=False), torch.nn.ReLU(), torch.nn.Linear(32, 4, bias=False)
    )
    opt = AGD(net.parameters())
    opt.init_weights()
    start = F.mse_loss(net(x), target).item()
    for _ in range(300):
        opt.zero_grad()
        F.mse_loss(net(x), target).backward()
        opt.step()
    assert F.mse_loss(net(x), target).item() < 0.2 * start


# ---------------------------------------------------------------- state_dict round trip

FACTORIES = {
    "adam-atan2": lambda p: AdamAtan2(p, lr=0.01, weight_decay=0.1),
    "sophiag": lambda p: SophiaG(p, lr=0.01, bs=8),
    "agd": lambda p: AGD(p, gain=0.7),
    "mfac": lambda p: MFAC(p, lr=0.01, momentum=0.5, ngrads=3, damp=1e-3),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trip_continues_identically(name):
    x, y, model = _softmax_regression(3)
    opt = FACTORIES[name](model.parameters())

    def run(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if isinstance(opt, SophiaG):
                opt.update_hessian()

    run(model, opt, 3)
    twin = copy.deepcopy(model)
    twin_opt = FACTORIES[name](twin.parameters())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(model, opt, 3)
    run(twin, twin_opt, 3)
    torch.testing.assert_close(twin.weight, model.weight, rtol=0, atol=0)


# ---------------------------------------------------------------- through the trainer


@pytest.mark.parametrize("name", ["adam-atan2", "sophiag", "agd", "mfac"])
def test_the_trainer_runs_each_and_lowers_the_loss(tmp_path, name):
    opts = {"mfac": {"ngrads": "8"}, "sophiag": {"hessian_every": "2"}}.get(name, {})
    lr = {"agd": 0.5, "mfac": 1e-3, "sophiag": 3e-3}.get(name, 1e-2)
    cfg = tiny_config(tmp_path, optimizer=name, steps=8, eval_every=8, lr=lr, warmup=0, opts=opts)
    summary = train(cfg)
    assert summary["steps"] == 8 and load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 8
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert summary["final_val_loss"] < rows[0]["val_loss"]


def test_agd_keeps_norm_gains_frozen_and_sophia_counts_its_refreshes(tmp_path):
    cfg = tiny_config(tmp_path, optimizer="agd", steps=3, eval_every=3, warmup=0, lr=1.0)
    train(cfg)
    model = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    gains = [v for k, v in model.items() if k.endswith("ln_1.weight") or k.endswith("ln_f.weight")]
    assert gains and all(torch.equal(g, torch.ones_like(g)) for g in gains)
    s = train(
        replace(
            cfg,
            optimizer="sophiag",
            steps=4,
            eval_every=4,
            out=str(tmp_path / "s"),
            opts={"hessian_every": "2"},
            lr=1e-3,
        )
    )
    plain = train(replace(cfg, optimizer="adamw", steps=4, eval_every=4, out=str(tmp_path / "a"), lr=1e-3))
    # two refreshes of a forward and a backward each: 2 x 3 more forward-token-equivalents per token
    tokens_per_step = plain["forward_tokens"] / 4 / 3
    assert s["forward_tokens"] == pytest.approx(plain["forward_tokens"] + 2 * 3 * tokens_per_step)


def test_sophiag_resumes_exactly(tmp_path):
    cfg = tiny_config(
        tmp_path,
        optimizer="sophiag",
        out=str(tmp_path / "one"),
        steps=6,
        eval_every=3,
        opts={"hessian_every": "2"},
        lr=1e-3,
    )
    train(cfg)
    train(replace(cfg, out=str(tmp_path / "two"), steps=3, lr_decay_steps=6))
    train(replace(cfg, out=str(tmp_path / "two"), resume="auto"))
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("one", "two"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["method"]["steps_done"] == b["method"]["steps_done"] == 6


def test_sophiag_needs_a_loss_that_draws_targets(tmp_path):
    cfg = tiny_config(tmp_path, optimizer="sophiag", lr=1e-3)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(UsageError, match="cannot draw"):
        get_method("sophiag").build(model, lambda m, x, y: F.cross_entropy(m(x), y, reduction="none"), cfg)


def test_mfac_refuses_a_window_that_cannot_fit(tmp_path):
    cfg = tiny_config(tmp_path, optimizer="mfac", opts={"ngrads": str(10**9)})
    with pytest.raises(UsageError, match="lower --opt ngrads"):
        train(cfg)


@pytest.mark.parametrize("module", ["adam_atan2", "sophia", "agd", "mfac", "adamw_muon"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"nograd.optim.{module}"))
    assert result.attempted > 0 and result.failed == 0
