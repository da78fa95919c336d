"""Zeroth-order gradient estimators against autograd.

Statistical checks use fixed seeds (deterministic) and a bound that a sign or scale error
cannot pass: with n independent single-direction estimates, ``|mean - true|`` (in norm) is at
most ``K * sqrt(sum_i var_i / n)``, and each test also asserts that this bound is a small
fraction of ``|true|``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nograd.models.gpt import GPT, GPTConfig
from nograd.zo import ForwardGradientEstimator, HiZOOEstimator, SPSAEstimator
from nograd.zo.estimators import hizoo_tensor_update

pytestmark = pytest.mark.usefixtures("one_thread")


K = 3.0  # a d-dim (d >= 5) mean error exceeds 3x its rms norm with probability < 1e-8


def quadratic(d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g)
    a = m @ m.T / d + torch.eye(d)
    b = torch.randn(d, generator=g)
    theta = torch.randn(d, generator=g)
    return a, b, theta


def logistic_data(n: int = 128, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w_true = torch.randn(d, generator=g)
    y = (x @ w_true + 0.3 * torch.randn(n, generator=g) > 0).float()
    return x, y


def collect(est, closure, params, n: int) -> torch.Tensor:
    """n single-direction estimates, flattened: (n, d)."""
    rows = []
    for _ in range(n):
        est.estimate(closure)
        rows.append(torch.cat([p.grad.flatten() for p in params]).clone())
    return torch.stack(rows)


def assert_unbiased(samples: torch.Tensor, true: torch.Tensor) -> None:
    n = samples.shape[0]
    mean = samples.double().mean(0)
    bound = K * math.sqrt(float(samples.double().var(0).sum()) / n)
    err = float((mean - true.double()).norm())
    assert bound < 0.5 * float(true.norm()), "the test has no power against a scale error"
    assert err < bound, f"|mean - true| = {err:.4g} > {bound:.4g}"


def test_spsa_quadratic_unbiased():
    a, b, theta0 = quadratic()
    theta = theta0.clone().requires_grad_(True)
    closure = lambda: 0.5 * theta @ a @ theta + b @ theta  # noqa: E731
    true = a @ theta0 + b
    est = SPSAEstimator([theta], eps=1e-2, directions=1, seed=1)
    samples = collect(est, closure, [theta], 400)
    assert torch.equal(theta.detach(), theta0)  # estimating never moves the weights
    assert_unbiased(samples, true)


@pytest.mark.parametrize("one_sided", [False, True])
def test_spsa_logistic_regression_module(one_sided):
    x, y = logistic_data()
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)

    def loss():
        return F.binary_cross_entropy_with_logits(model(x).squeeze(1), y)

    true = torch.cat([t.flatten() for t in torch.autograd.grad(loss(), list(model.parameters()))])
    est = SPSAEstimator(model, eps=1e-3, directions=1, one_sided=one_sided, seed=2)
    samples = collect(est, loss, list(model.parameters()), 400)
    assert_unbiased(samples, true)
    assert est.last_info["forwards"] == 2


def test_spsa_directions_average_and_rademacher():
    """n directions per estimate average n single-direction estimates; Rademacher noise also works."""
    a, b, theta0 = quadratic(seed=3)
    theta = theta0.clone().requires_grad_(True)
    closure = lambda: 0.5 * theta @ a @ theta + b @ theta  # noqa: E731
    est = SPSAEstimator([theta], eps=1e-2, directions=8, distribution="rademacher", seed=4)
    samples = collect(est, closure, [theta], 60)
    assert_unbiased(samples, a @ theta0 + b)
    assert est.last_info["forwards"] == 16


def test_spsa_estimator_with_torch_optimizer():
    x, y = logistic_data(seed=1)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    loss = lambda: F.binary_cross_entropy_with_logits(model(x).squeeze(1), y)  # noqa: E731
    est = SPSAEstimator(model, eps=1e-3, directions=4, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    first = float(loss().detach())
    for _ in range(60):
        opt.zero_grad()
        est.estimate(loss)
        opt.step()
    assert float(loss().detach()) < 0.6 * first


def test_forward_gradient_directional_derivative_exact():
    """grad f . v from jvp equals autograd's gradient dotted with the same tangent."""
    x, y = logistic_data(seed=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    fn = lambda m: F.binary_cross_entropy_with_logits(m(x).squeeze(1), y)  # noqa: E731
    grads = torch.autograd.grad(fn(model), list(model.parameters()))
    est = ForwardGradientEstimator(model, tangents=3, seed=5)
    ev = est.evaluate(fn, generation=7)
    assert ev.directions == [0, 1, 2]
    for k, deriv in zip(ev.directions, ev.diffs):
        v = [est.space.dense(est.noise, i, 7, k) for i in range(len(est.space))]
        expected = sum(float((g * t).sum()) for g, t in zip(grads, v))
        assert deriv == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert ev.loss == pytest.approx(float(fn(model).detach()), rel=1e-6)


def test_forward_gradient_unbiased_on_tensors():
    a, b, theta0 = quadratic(seed=6)
    theta = theta0.clone().requires_grad_(True)
    est = ForwardGradientEstimator([theta], tangents=1, seed=3)
    samples = collect(est, lambda ps: 0.5 * ps[0] @ a @ ps[0] + b @ ps[0], [theta], 400)
    assert_unbiased(samples, a @ theta0 + b)


def test_forward_gradient_gpt_math_attention():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16, attention="math")
    model = GPT(cfg)
    idx = torch.randint(0, 11, (2, 8))
    tgt = torch.randint(0, 11, (2, 8))
    fn = lambda m: F.cross_entropy(m(idx).reshape(-1, 11), tgt.reshape(-1))  # noqa: E731
    grads = torch.autograd.grad(fn(model), list(model.parameters()))
    est = ForwardGradientEstimator(model, tangents=1, seed=0)
    ev = est.evaluate(fn, generation=0)
    v = [est.space.dense(est.noise, i, 0, 0) for i in range(len(est.space))]
    expected = sum(float((g * t).sum()) for g, t in zip(grads, v))
    assert ev.diffs[0] == pytest.approx(expected, rel=1e-4)


def test_hizoo_curvature_is_the_preconditioned_quadratic_form():
    """On a quadratic, L+ + L- - 2 L0 = mu^2 (u / sqrt(D))^T A (u / sqrt(D)) exactly (float64)."""
    a, b, theta0 = quadratic(d=5, seed=8)
    a, b, theta0 = a.double(), b.double(), theta0.double()
    theta = theta0.clone().requires_grad_(True)
    closure = lambda: 0.5 * theta @ a @ theta + b @ theta  # noqa: E731
    mu = 1e-3
    est = HiZOOEstimator([theta], eps=mu, directions=3, seed=0)
    d = [torch.linspace(0.5, 4.0, 5, dtype=torch.float32)]
    ev = est.evaluate(closure, 11, hessian=d, curvature=True)
    assert ev.center == pytest.approx(float(closure().detach()), rel=1e-12)
    for k, curv, diff in zip(ev.directions, ev.curvature, ev.diffs):
        s = est.space.dense(est.noise, 0, 11, k).double() / d[0].double().sqrt()
        assert curv == pytest.approx(mu**2 * float(s @ a @ s), rel=1e-6)
        assert diff == pytest.approx(mu * float((a @ theta0 + b) @ s), rel=1e-6)
    assert torch.equal(theta.detach(), theta0)


def test_hizoo_tensor_update_equations():
    """One tensor update follows the documented equations exactly (float32)."""
    theta = torch.randn(7, requires_grad=True)
    est = HiZOOEstimator([theta], eps=1e-3, seed=0)
    d_old = torch.rand(7) + 0.5
    d = d_old.clone()
    coeffs, curv, smooth = [(0, 0.3), (1, -0.2)], [0.05, -0.01], 0.1
    out = hizoo_tensor_update(est.space, est.noise, 0, 4, d, coeffs, curv, smooth)
    u = [est.space.dense(est.noise, 0, 4, k) for k in (0, 1)]
    h_hat = (curv[0] * (u[0] ** 2 - 1) + curv[1] * (u[1] ** 2 - 1)) * d_old
    d_new = (1 - smooth) * d_old + smooth * h_hat.abs()
    torch.testing.assert_close(d, d_new)
    torch.testing.assert_close(out, (0.3 * u[0] - 0.2 * u[1]) / d_new.sqrt())


def test_hizoo_estimator_fills_grad_and_adapts():
    a, b, theta0 = quadratic(seed=9)
    theta = theta0.clone().requires_grad_(True)
    est = HiZOOEstimator([theta], eps=1e-2, directions=2, hessian_smooth=0.05, seed=0)
    loss = est.estimate(lambda: 0.5 * theta @ a @ theta + b @ theta)
    assert theta.grad is not None and torch.isfinite(theta.grad).all()
    assert est.last_info["forwards"] == 5  # L0 + 2 directions x 2
    assert loss == pytest.approx(float(0.5 * theta0 @ a @ theta0 + b @ theta0), rel=1e-6)
    assert not torch.equal(est.hessian[0], torch.ones(6))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eps": 0.0},
        {"eps": -1e-3},
        {"eps": float("nan")},
        {"directions": 0},
        {"directions": 1.5},
        {"noise_rank": -1},
        {"distribution": "uniform"},
    ],
)
def test_spsa_estimator_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        SPSAEstimator(torch.nn.Linear(2, 1), **kwargs)


def test_other_estimators_bad_hyperparameters():
    with pytest.raises(ValueError):
        ForwardGradientEstimator(torch.nn.Linear(2, 1), tangents=0)
    with pytest.raises(ValueError):
        HiZOOEstimator(torch.nn.Linear(2, 1), hessian_smooth=0.0)
    with pytest.raises(ValueError):
        HiZOOEstimator(torch.nn.Linear(2, 1), hessian_smooth=1.5)
