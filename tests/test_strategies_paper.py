"""One generation of LM-MA-ES, Rm-ES, SNES, PGPE and CEM recomputed from the papers' equations.

Each check takes the strategy's own samples (regenerated from its seeds), recomputes the update
with the constants written out from the paper, and compares with ``tell``; a wrong constant, a
wrong sign or a wrong sample would show.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nograd.core.shaping import centered_ranks
from nograd.strategies import CEM, LMMAES, PGPE, SNES, RmES
from nograd.strategies.functions import ellipsoid, rosenbrock, sphere


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def log_weights(lam: int) -> np.ndarray:
    mu = lam // 2
    w = np.log((lam + 1) / 2) - np.log(np.arange(1, mu + 1))
    return w / w.sum()


def test_lm_ma_es_one_generation_by_hand() -> None:
    """Loshchilov, Glasmachers & Beyer (2019), Algorithm 1."""
    n = 40
    es = LMMAES(torch.linspace(-1, 1, n, dtype=torch.float64), 0.3, seed=1)
    lam = 4 + int(3 * math.log(n))
    m = 4 + int(3 * math.log(n))
    assert es.popsize == lam and es.memory == m
    for _ in range(6):  # t = 6 < m: only the first 6 vectors are in use
        es.tell(rosenbrock(es.ask()))
    w = log_weights(lam)
    mu_w = 1 / np.sum(w**2)
    c_sigma = 2 * lam / n
    c_d = np.array([1 / (1.5**j * n) for j in range(m)])
    c_c = np.array([lam / (4.0**j * n) for j in range(m)])
    np.testing.assert_allclose(es.c_d.numpy(), c_d, rtol=1e-15)
    np.testing.assert_allclose(es.c_c.numpy(), c_c, rtol=1e-15)
    assert es.c_sigma == pytest.approx(c_sigma, rel=1e-15)
    y, sigma, p, M, t = (
        es.mean.numpy().copy(),
        es.sigma,
        es.p_sigma.numpy().copy(),
        es.M.numpy().copy(),
        es.generation,
    )
    z = es.standard_normal().numpy()
    d = z.copy()
    for i in range(lam):  # the paper's per-sample loop of rank-one transforms
        for j in range(min(t, m)):
            d[i] = (1 - c_d[j]) * d[i] + c_d[j] * M[j] * (M[j] @ d[i])
    X = es.ask()
    np.testing.assert_allclose(X.numpy(), y + sigma * d, rtol=1e-12, atol=1e-12)
    f = rosenbrock(X).numpy()
    sel = np.argsort(f, kind="stable")[: lam // 2]
    y_new = y + sigma * (w @ d[sel])
    z_w = w @ z[sel]
    p_new = (1 - c_sigma) * p + math.sqrt(mu_w * c_sigma * (2 - c_sigma)) * z_w
    M_new = np.stack([(1 - c_c[j]) * M[j] + math.sqrt(mu_w * c_c[j] * (2 - c_c[j])) * z_w for j in range(m)])
    sigma_new = sigma * math.exp(c_sigma / 2 * (np.sum(p_new**2) / n - 1))
    es.tell(torch.as_tensor(f))
    np.testing.assert_allclose(es.mean.numpy(), y_new, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(es.p_sigma.numpy(), p_new, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(es.M.numpy(), M_new, rtol=1e-12, atol=1e-13)
    assert es.sigma == pytest.approx(sigma_new, rel=1e-12)


def test_lm_ma_es_float32_samples_with_every_memory_vector_in_use() -> None:
    """With float32 samples and the paper's stream, the products and the candidates are float32:
    they match the paper's loop in float64 to float32 rounding once all m vectors are in use."""
    n = 300
    es = LMMAES(torch.linspace(-1, 1, n, dtype=torch.float64), 0.3, seed=2, sampling="paper")
    es.sample_dtype = torch.float32
    for _ in range(es.memory + 2):
        es.tell(sphere(es.ask().double()))
    assert es.generation > es.memory
    y, sigma, M = es.mean.numpy(), es.sigma, es.M.numpy()
    z = es.standard_normal().double().numpy()
    d = z.copy()
    for j in range(es.memory):
        c = float(es.c_d[j])
        d = (1 - c) * d + c * np.outer(d @ M[j], M[j])
    X = es.ask()
    assert X.dtype == torch.float32
    np.testing.assert_allclose(X.double().numpy(), y + sigma * d, rtol=1e-5, atol=1e-6)
    assert np.abs(d - z).max() > 1e-3  # the memory really changes the samples


def _lm_ma_es_transform_matrix(es: LMMAES) -> np.ndarray:
    """``T`` of the current generation, from the paper's loop of rank-one transforms."""
    M = es.M.numpy()
    T = np.eye(es.dim)  # row i becomes T e_i (each factor is symmetric)
    for j in range(min(es.generation, es.memory)):
        c = float(es.c_d[j])
        T = (1 - c) * T + c * np.outer(T @ M[j], M[j])
    return T.T


@pytest.mark.parametrize("dtype,n", [(torch.float64, 30), (torch.float32, 300)])
def test_lm_ma_es_direct_sampling_has_the_papers_covariance(dtype: torch.dtype, n: int) -> None:
    """Drawn directly, d = s g + N^T u has covariance s^2 I + N^T N = T T^T of the paper's loop. With
    float32 samples, the directions dropped below float32's rounding change no entry by more than
    2 J (2^-24 s)^2, and there are far fewer than J left."""
    es = LMMAES(torch.linspace(-1, 1, n, dtype=torch.float64), 0.3, seed=3, sampling="direct")
    es.sample_dtype = dtype
    for _ in range(es.memory + 3):
        es.tell(ellipsoid(es.ask().double()))
    T = _lm_ma_es_transform_matrix(es)
    scale, N = es.covariance_factor()
    cov = scale**2 * np.eye(n) + N.numpy().T @ N.numpy()
    J = min(es.generation, es.memory)
    bound = 2 * J * (torch.finfo(dtype).eps / 2 * scale) ** 2
    assert np.abs(cov - T @ T.T).max() <= bound + 2e-12  # (float64 rounding of the factor)
    assert np.abs(T @ T.T - np.eye(n)).max() > 1e-2  # the memory shapes the distribution
    if dtype == torch.float32:
        assert N.shape[0] < J, N.shape
    # the candidates are y + σ (s g + N^T u) with the strategy's own numbers
    g = es.standard_normal().double()
    u = es.noise.members((J,), generation=es.generation, members=range(es.popsize), index=1)
    X = es.ask().double()
    expected = es.mean + es.sigma * (scale * g + u[:, : N.shape[0]].double() @ N)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(X, expected, rtol=tol, atol=tol)


def test_lm_ma_es_direct_tell_follows_the_papers_update() -> None:
    """With directly drawn d, tell recovers z_w = T^{-1} Σ w d and updates as Algorithm 1; the kept
    Gram matrix equals M M^T."""
    n = 30
    es = LMMAES(torch.linspace(-1, 1, n, dtype=torch.float64), 0.3, seed=4, sampling="direct")
    for _ in range(8):
        es.tell(rosenbrock(es.ask()))
    lam, m = es.popsize, es.memory
    w = log_weights(lam)
    mu_w, cs = 1 / np.sum(w**2), es.c_sigma
    c_c = es.c_c.numpy()
    y, sigma, p, M = es.mean.numpy().copy(), es.sigma, es.p_sigma.numpy().copy(), es.M.numpy().copy()
    T = _lm_ma_es_transform_matrix(es)
    X = es.ask()
    f = rosenbrock(X).numpy()
    sel = np.argsort(f, kind="stable")[: lam // 2]
    d_w = w @ ((X.numpy()[sel] - y) / sigma)
    z_w = np.linalg.solve(T, d_w)
    p_new = (1 - cs) * p + math.sqrt(mu_w * cs * (2 - cs)) * z_w
    M_new = np.stack([(1 - c_c[j]) * M[j] + math.sqrt(mu_w * c_c[j] * (2 - c_c[j])) * z_w for j in range(m)])
    sigma_new = sigma * math.exp(cs / 2 * (np.sum(p_new**2) / n - 1))
    es.tell(torch.as_tensor(f))
    np.testing.assert_allclose(es.mean.numpy(), y + sigma * d_w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(es.p_sigma.numpy(), p_new, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(es.M.numpy(), M_new, rtol=1e-9, atol=1e-11)
    assert es.sigma == pytest.approx(sigma_new, rel=1e-9)
    np.testing.assert_allclose(es.gram.numpy(), M_new @ M_new.T, rtol=1e-10, atol=1e-10)
    z, _ = es.untransform(torch.as_tensor(T @ z_w))  # the push-through inverse of the new T
    assert not np.allclose(z.numpy(), z_w)  # (T changed with M)


def test_rm_es_one_generation_by_hand() -> None:
    """Li & Zhang (2018), Algorithms 2-3 (sampling, mean, path, path memory, PSR)."""
    n = 30
    es = RmES(torch.linspace(-1, 1, n, dtype=torch.float64), 0.3, seed=2, gap=3)
    lam = 4 + int(3 * math.log(n))
    mu = lam // 2
    c_cov, c, c_s, q_star, d_sigma = 1 / (3 * math.sqrt(n) + 5), 2 / (n + 7), 0.3, 0.3, 1.0
    assert (es.c_cov, es.c, es.c_s, es.q_star, es.d_sigma) == pytest.approx((c_cov, c, c_s, q_star, d_sigma))
    for _ in range(7):
        es.tell(ellipsoid(es.ask()))
    w = log_weights(lam)
    mu_eff = 1 / np.sum(w**2)
    mean, sigma, p, s = es.mean.numpy().copy(), es.sigma, es.p.numpy().copy(), es.s
    P, t_hat, prev = es.P.numpy().copy(), es.t_hat.tolist(), es.prev_best.numpy().copy()
    m = P.shape[0]
    a, b = math.sqrt(1 - c_cov), math.sqrt(c_cov)
    z, r = es.standard_normal().numpy(), es.path_scalars().numpy()
    X_ref = mean + sigma * (
        a**m * z + b * sum(a ** (m - i) * r[:, [i - 1]] * P[i - 1] for i in range(1, m + 1))
    )
    X = es.ask()
    np.testing.assert_allclose(X.numpy(), X_ref, rtol=1e-12, atol=1e-12)
    f = ellipsoid(X).numpy()
    order = np.argsort(f, kind="stable")
    mean_new = w @ X_ref[order[:mu]]
    p_new = (1 - c) * p + math.sqrt(c * (2 - c) * mu_eff) * (mean_new - mean) / sigma
    # PSR: rank the mu best of the previous and of this generation together
    both = np.concatenate([prev, f[order[:mu]]])
    ranks = np.empty(2 * mu)
    ranks[np.argsort(both, kind="stable")] = np.arange(1, 2 * mu + 1)
    q = np.sum(w * (ranks[:mu] - ranks[mu:])) / mu
    s_new = (1 - c_s) * s + c_s * (q - q_star)
    sigma_new = sigma * math.exp(s_new / d_sigma)
    # Algorithm 2 with t = 8 generations done and T = 3
    t = es.generation + 1
    gaps = np.diff(t_hat)
    drop = 0 if (t < m or gaps.min() > 3) else int(np.argmin(gaps)) + 1
    keep = [i for i in range(m) if i != drop]
    P_new = np.concatenate([P[keep], p_new[None]])
    t_new = [t_hat[i] for i in keep] + [t]
    es.tell(torch.as_tensor(f))
    np.testing.assert_allclose(es.mean.numpy(), mean_new, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(es.p.numpy(), p_new, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(es.P.numpy(), P_new, rtol=1e-10, atol=1e-12)
    assert es.t_hat.tolist() == t_new
    assert es.s == pytest.approx(s_new, rel=1e-12, abs=1e-15)
    assert es.sigma == pytest.approx(sigma_new, rel=1e-12)


def test_rm_es_path_memory_keeps_spacing() -> None:
    es = RmES(torch.zeros(8, dtype=torch.float64), 1.0, seed=0, paths=3, gap=4)
    stamps = []
    for _ in range(30):
        es.tell(sphere(es.ask()))
        stamps.append(es.t_hat.tolist())
    assert stamps[0] == [0, 0, 1] and stamps[1] == [0, 1, 2]  # t < m: drop the oldest
    last = stamps[-1]
    assert last[-1] == 30  # the newest path is always the current one
    assert all(b - a >= 1 for a, b in zip(last, last[1:]))
    assert last[-1] - last[0] >= 4  # older paths stay about `gap` generations back


def test_snes_one_generation_by_hand() -> None:
    """Schaul, Glasmachers & Schmidhuber (2011), SNES with Table 1 defaults."""
    n = 25
    es = SNES(torch.linspace(-1, 1, n, dtype=torch.float64), 0.4, seed=3)
    lam = 4 + int(3 * math.log(n))
    eta_sigma = (3 + math.log(n)) / (5 * math.sqrt(n))
    assert es.popsize == lam and es.eta_mu == 1.0 and es.eta_sigma == pytest.approx(eta_sigma)
    for _ in range(3):
        es.tell(ellipsoid(es.ask()))
    mu, sd = es.mean.numpy().copy(), es.stdev.numpy().copy()
    s = es.standard_normal().numpy()
    X = es.ask()
    np.testing.assert_allclose(X.numpy(), mu + sd * s, rtol=1e-13, atol=1e-13)
    f = ellipsoid(X).numpy()
    raw = np.maximum(0, np.log(lam / 2 + 1) - np.log(np.arange(1, lam + 1)))
    u = raw / raw.sum() - 1 / lam
    ss = s[np.argsort(f, kind="stable")]
    grad_mu = u @ ss
    grad_sigma = u @ (ss**2 - 1)
    es.tell(torch.as_tensor(f))
    np.testing.assert_allclose(es.mean.numpy(), mu + 1.0 * sd * grad_mu, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(es.stdev.numpy(), sd * np.exp(eta_sigma / 2 * grad_sigma), rtol=1e-12)


def test_pgpe_one_generation_by_hand() -> None:
    """Sehnke et al. (2010) symmetric sampling + Toklu et al. (2020) ClipUp."""
    n, lam = 20, 10
    es = PGPE(torch.linspace(-1, 1, n, dtype=torch.float64), 0.3, popsize=lam, seed=4, max_speed=0.2)
    assert es.step_size == pytest.approx(0.1) and es.momentum == 0.9 and es.stdev_lr == 0.1
    for _ in range(3):
        es.tell(sphere(es.ask()))
    mu, sd, v = es.mean.numpy().copy(), es.stdev.numpy().copy(), es.velocity.numpy().copy()
    z = es.standard_normal().numpy()  # one vector per pair
    assert z.shape == (lam // 2, n)
    eps = sd * z
    X = es.ask().numpy()
    np.testing.assert_allclose(X[0::2], mu + eps, rtol=1e-13, atol=1e-13)  # member 2k = mu + eps_k
    np.testing.assert_allclose(X[1::2], mu - eps, rtol=1e-13, atol=1e-13)  # member 2k+1 = mu - eps_k
    f = sphere(torch.as_tensor(X))
    u = centered_ranks(f).numpy()  # worst loss -> +0.5
    up, um = u[0::2], u[1::2]
    g_mu = ((up - um) / 2) @ eps / (lam // 2)
    g_sigma = (((up + um) / 2 - u.mean())[:, None] * (eps**2 - sd**2) / sd).sum(0) / (lam // 2)
    v_new = 0.9 * v + 0.1 * g_mu / np.linalg.norm(g_mu)
    if np.linalg.norm(v_new) > 0.2:
        v_new = v_new * 0.2 / np.linalg.norm(v_new)
    sd_new = np.clip(sd - 0.1 * g_sigma, 0.8 * sd, 1.2 * sd)
    es.tell(f)
    np.testing.assert_allclose(es.velocity.numpy(), v_new, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(es.mean.numpy(), mu - v_new, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(es.stdev.numpy(), sd_new, rtol=1e-12)
    assert np.linalg.norm(es.velocity.numpy()) <= 0.2 + 1e-12


def test_cem_one_generation_by_hand() -> None:
    """De Boer et al. (2005) smoothed CE update + Szita & Lőrincz (2006) extra noise."""
    n, lam = 15, 20
    es = CEM(
        torch.linspace(-1, 1, n, dtype=torch.float64),
        0.5,
        popsize=lam,
        seed=5,
        extra_noise=0.01,
        extra_noise_decay=0.001,
    )
    assert es.n_elite == 5 and es.smoothing == 0.7
    for _ in range(4):
        es.tell(sphere(es.ask()))
    mu, sd, t = es.mean.numpy().copy(), es.stdev.numpy().copy(), es.generation
    X = es.ask().numpy()
    f = sphere(torch.as_tensor(X)).numpy()
    elites = X[np.argsort(f, kind="stable")[:5]]
    z_t = max(0.01 - 0.001 * t, 0.0)
    mu_new = 0.3 * mu + 0.7 * elites.mean(0)
    sd_new = np.sqrt(0.3 * sd**2 + 0.7 * (elites.var(0) + z_t))
    es.tell(torch.as_tensor(f))
    np.testing.assert_allclose(es.mean.numpy(), mu_new, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(es.stdev.numpy(), sd_new, rtol=1e-10)
