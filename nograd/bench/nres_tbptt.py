"""NRES vs truncated backprop (TBPTT) on influence balancing, a task where truncation biases AD.

The influence-balancing system (Tallec & Ollivier 2017, "Unbiased Online Recurrent
Optimization", arXiv 1702.05043; used again by PES, Vicol et al. 2021) is a linear dynamical
system with one scalar parameter ``theta``:

    s_{t+1} = A s_t + theta c,   A = (I + shift) / 2,   c = (1, ..., 1, -1, ..., -1)  (p ones)
    L_t = 1/2 (s_t[0] - 1)^2,    episode loss  L(theta) = 1/T sum_{t=1..T} L_t,   s_0 = 0.

``theta`` raises ``s[0]`` at once (the first p units push up), but the n - p negative units reach
``s[0]`` only after many steps and win in the long run (steady state ``s[0] = 2 theta (2p - n)``).
Backprop truncated to a short window sees only the short-term, positive influence and drives
``theta`` the wrong way; NRES, which reuses each worker's noise for its whole episode, follows the
true episode loss. Both run the same number of windows with the same staggered workers.

Measured with the defaults (T = 200, W = 10, 64 staggered workers, SGD lr 0.002, 200 updates,
sigma 0.01): the optimum is theta* = -0.0535 with L* = 0.4275 (L(0) = 0.5). NRES ends at
theta = -0.0467, L = 0.4287; TBPTT ends at theta = +17.7, L = 8027 (it diverges).

Run: ``python -m nograd.bench.nres_tbptt --json`` (or ``nograd bench nres``).
"""

from __future__ import annotations

import json
import time

import torch
from torch import nn

from nograd.bench import BenchArgumentParser
from nograd.strategies.nres import NRES


class InfluenceBalancing(nn.Module):
    """``s -> A s + theta c`` with ``theta`` held by a 1x1 ``nn.Linear`` (so the batched engine hooks it)."""

    def __init__(self, n: int = 23, p: int = 10, theta: float = 0.0) -> None:
        super().__init__()
        if not 0 < p < n:
            raise ValueError(f"need 0 < p < n, got p={p}, n={n}")
        self.n = n
        self.theta = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.theta.weight.fill_(theta)
        a = 0.5 * (torch.eye(n) + torch.diag(torch.ones(n - 1), 1))
        self.register_buffer("a_t", a.T.contiguous())
        self.register_buffer("c", torch.cat([torch.ones(p), -torch.ones(n - p)]))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s @ self.a_t + self.theta(s.new_ones(s.shape[0], 1)) * self.c

    def init_state(self, episodes: int) -> torch.Tensor:
        return torch.zeros(episodes, self.n)

    def steady_state_theta(self) -> float:
        return 1.0 / (2.0 * float(self.c.sum()))


def unroll(model: nn.Module, s: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``steps`` steps; returns the new state and each row's loss averaged over the steps."""
    total = s.new_zeros(s.shape[0])
    for _ in range(steps):
        s = model(s)
        total = total + 0.5 * (s[:, 0] - 1.0) ** 2
    return s, total / steps


@torch.no_grad()
def episode_loss(model: InfluenceBalancing, episode_length: int) -> float:
    """The full-episode loss ``1/T sum_t L_t`` of the current ``theta`` from ``s_0 = 0``."""
    _, loss = unroll(model, model.init_state(1), episode_length)
    return float(loss)


def best_theta(episode_length: int, n: int = 23, p: int = 10) -> tuple[float, float]:
    """``(theta*, L(theta*))`` of the full-episode loss, by autograd on the exact unroll + Newton."""
    model = InfluenceBalancing(n, p, 0.0)
    theta = torch.zeros((), dtype=torch.float64, requires_grad=True)
    a_t, c = model.a_t.double(), model.c.double()

    def loss_of(th: torch.Tensor) -> torch.Tensor:
        s, total = torch.zeros(1, n, dtype=torch.float64), 0.0
        for _ in range(episode_length):
            s = s @ a_t + th * c
            total = total + 0.5 * (s[0, 0] - 1.0) ** 2
        return total / episode_length

    for _ in range(3):  # the loss is quadratic in theta: one Newton step is exact
        (g,) = torch.autograd.grad(loss_of(theta), theta, create_graph=True)
        (h,) = torch.autograd.grad(g, theta)
        theta = (theta - g / h).detach().requires_grad_(True)
    with torch.no_grad():
        return float(theta), float(loss_of(theta))


def _optimizer(model: nn.Module, outer: str, lr: float) -> torch.optim.Optimizer:
    if outer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if outer == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    raise ValueError(f"outer must be 'sgd' or 'adam', got {outer!r}")


def train_nres(
    updates: int,
    *,
    episode_length: int = 200,
    window: int = 10,
    workers: int = 64,
    sigma: float = 0.01,
    lr: float = 0.002,
    outer: str = "sgd",
    seed: int = 0,
    theta: float = 0.0,
) -> tuple[InfluenceBalancing, list[float]]:
    model = InfluenceBalancing(theta=theta)
    nres = NRES(
        model,
        sigma=sigma,
        population=2 * workers,
        window=window,
        episode_length=episode_length,
        init_state=model.init_state,
        optimizer=_optimizer(model, outer, lr),
        seed=seed,
    )
    thetas = []
    for _ in range(updates):
        nres.step(unroll)
        thetas.append(model.theta.weight.item())
    return model, thetas


def train_tbptt(
    updates: int,
    *,
    episode_length: int = 200,
    window: int = 10,
    workers: int = 64,
    lr: float = 0.002,
    outer: str = "sgd",
    theta: float = 0.0,
) -> tuple[InfluenceBalancing, list[float]]:
    """Truncated backprop: ``workers`` staggered trajectories, gradient through each window only."""
    model = InfluenceBalancing(theta=theta)
    opt = _optimizer(model, outer, lr)
    windows = episode_length // window
    offsets = torch.tensor([k * windows // workers for k in range(workers)]) * window
    s = model.init_state(workers)
    with torch.no_grad():  # the same step-unlocking warm-up as NRES
        for w in range(int(offsets.max()) // window):
            new, _ = unroll(model, s, window)
            s = torch.where((offsets > w * window).view(-1, 1), new, s)
    position = offsets.clone()
    thetas = []
    for _ in range(updates):
        s, loss = unroll(model, s.detach(), window)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        position += window
        done = position >= episode_length
        s = torch.where(done.view(-1, 1), model.init_state(workers), s.detach())
        position[done] = 0
        thetas.append(model.theta.weight.item())
    return model, thetas


def run(args: list[str]) -> dict:
    p = BenchArgumentParser(prog="nograd bench nres", description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--episode-length", type=int, default=200)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--sigma", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--outer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--seed", type=int, default=0, minimum=0)
    p.add_argument("--json", action="store_true", help="(accepted for the CLI; output is JSON anyway)")
    a = p.parse_args(args)
    torch.manual_seed(a.seed)
    kw = {
        "episode_length": a.episode_length,
        "window": a.window,
        "workers": a.workers,
        "lr": a.lr,
        "outer": a.outer,
    }
    theta_star, loss_star = best_theta(a.episode_length)
    start = episode_loss(InfluenceBalancing(theta=0.0), a.episode_length)
    out: dict = {
        "task": "influence-balancing n=23 p=10",
        "episode_length": a.episode_length,
        "window": a.window,
        "workers": a.workers,
        "updates": a.updates,
        "outer": f"{a.outer} lr={a.lr}",
        "theta_star": theta_star,
        "loss_star": loss_star,
        "loss_start": start,
    }
    t0 = time.perf_counter()
    model, thetas = train_nres(a.updates, sigma=a.sigma, seed=a.seed, **kw)
    out["nres"] = {
        "theta": thetas[-1],
        "theta_mean_last_quarter": sum(thetas[-len(thetas) // 4 :]) / len(thetas[-len(thetas) // 4 :]),
        "episode_loss": episode_loss(model, a.episode_length),
        "seconds": time.perf_counter() - t0,
        "forward_steps": a.updates * a.window * 2 * a.workers,
    }
    t0 = time.perf_counter()
    model, thetas = train_tbptt(a.updates, **kw)
    out["tbptt"] = {
        "theta": thetas[-1],
        "theta_mean_last_quarter": sum(thetas[-len(thetas) // 4 :]) / len(thetas[-len(thetas) // 4 :]),
        "episode_loss": episode_loss(model, a.episode_length),
        "seconds": time.perf_counter() - t0,
        "forward_steps": a.updates * a.window * a.workers,
    }
    return out


if __name__ == "__main__":
    import sys

    print(json.dumps(run(sys.argv[1:]), indent=1))
