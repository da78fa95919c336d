"""Trainability maps (`nograd map`): the batched trainers against plain autograd and the written-out
formulas, the paper's score, box counting on shapes of known dimension, and the command line."""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from nograd.cli import main
from nograd.core.errors import UsageError
from nograd.workbench import trainability as tm

D = torch.float64


@pytest.fixture(scope="module")
def problem() -> tm.Problem:
    return tm.make_problem(width=16, seed=0, dtype=D)[0]


def batch(problem: tm.Problem, G: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """G networks near the shared init, each one different (so a mix-up between pixels shows)."""
    gen = torch.Generator().manual_seed(seed)
    W1 = problem.W1 + 0.3 * torch.randn(G, *problem.W1.shape, generator=gen, dtype=D)
    W2 = problem.W2 + 0.3 * torch.randn(G, *problem.W2.shape, generator=gen, dtype=D)
    return W1, W2


def plain_loss(X: torch.Tensor, Y: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    """One network, written as in the paper: tanh(sqrt(2) X W1 / sqrt(d)) W2 / sqrt(n) / sqrt(n)."""
    d, n = W1.shape
    h = torch.tanh(math.sqrt(2) * (X @ W1) / math.sqrt(d))
    f = (h @ W2[:, None]).squeeze(1) / math.sqrt(n) / math.sqrt(n)
    return ((f - Y) ** 2).mean()


def autograd_of(X, Y, W1, W2):
    p1, p2 = nn.Parameter(W1.clone()), nn.Parameter(W2.clone())
    loss = plain_loss(X, Y, p1, p2)
    loss.backward()
    return loss.detach(), p1.grad, p2.grad


# ---------------------------------------------------------------- the batched network and gd


def test_problem_is_the_papers():
    p = tm.make_problem(width=16, seed=0)[0]
    assert p.X.shape == (272, 16) and p.Y.shape == (272,)  # N = number of parameters = 16*16 + 16
    assert p.W1.shape == (16, 16) and p.W2.shape == (16,)
    assert p.X.dtype == torch.float32


def test_batched_loss_and_grad_equal_autograd(problem):
    W1, W2 = batch(problem, 4)
    loss, g1, g2 = tm.loss_and_grad(problem.X, problem.Y, W1, W2)
    assert torch.allclose(tm.losses(problem.X, problem.Y, W1, W2), loss, rtol=1e-12)
    for g in range(4):
        ref_loss, ref1, ref2 = autograd_of(problem.X, problem.Y, W1[g], W2[g])
        assert torch.allclose(loss[g], ref_loss, rtol=1e-10, atol=1e-12)
        assert torch.allclose(g1[g], ref1, rtol=1e-9, atol=1e-12)
        assert torch.allclose(g2[g], ref2, rtol=1e-9, atol=1e-12)


def test_float32_grad_close_to_float64(problem):
    W1, W2 = batch(problem, 3)
    f32 = [t.float() for t in (problem.X, problem.Y, W1, W2)]
    loss, g1, g2 = tm.loss_and_grad(*f32)
    ref_loss, ref1, ref2 = tm.loss_and_grad(problem.X, problem.Y, W1, W2)
    assert torch.allclose(loss.double(), ref_loss, rtol=1e-5)
    assert torch.allclose(g1.double(), ref1, rtol=1e-4, atol=1e-6)
    assert torch.allclose(g2.double(), ref2, rtol=1e-4, atol=1e-6)


def test_gd_step_is_the_hand_update_with_each_pixels_lr(problem):
    W1, W2 = batch(problem, 3)
    lr_in = torch.tensor([0.1, 3.0, 50.0], dtype=D)
    lr_out = torch.tensor([7.0, 0.2, 1.0], dtype=D)
    loss, new1, new2 = tm.gd_step(problem.X, problem.Y, W1, W2, lr_in, lr_out)
    for g in range(3):
        ref_loss, ref1, ref2 = autograd_of(problem.X, problem.Y, W1[g], W2[g])
        assert torch.allclose(loss[g], ref_loss, rtol=1e-10)
        assert torch.allclose(new1[g], W1[g] - lr_in[g] * ref1, rtol=1e-10, atol=1e-12)
        assert torch.allclose(new2[g], W2[g] - lr_out[g] * ref2, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- the forward-only steps


def test_perturbed_losses_equal_separate_forwards(problem):
    W1, W2 = batch(problem, 3)
    gen = torch.Generator().manual_seed(5)
    D1, D2 = torch.randn(4, 16, 16, generator=gen, dtype=D), torch.randn(4, 16, generator=gen, dtype=D)
    L = tm.perturbed_losses(problem.X, problem.Y, W1, W2, D1, D2)
    for g in range(3):
        for i in range(4):
            ref = plain_loss(problem.X, problem.Y, W1[g] + D1[i], W2[g] + D2[i])
            assert torch.allclose(L[g, i], ref, rtol=1e-10)


def test_mezo_step_is_the_written_out_formula(problem):
    W1, W2 = batch(problem, 2)
    gen = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(16, 16, generator=gen, dtype=D), torch.randn(16, generator=gen, dtype=D)
    eps = 1e-3
    lr_in, lr_out = torch.tensor([0.01, 0.5], dtype=D), torch.tensor([0.3, 0.02], dtype=D)
    loss, new1, new2 = tm.mezo_step(problem.X, problem.Y, W1, W2, lr_in, lr_out, z1, z2, eps)
    X, Y = problem.X, problem.Y
    for g in range(2):
        plus = plain_loss(X, Y, W1[g] + eps * z1, W2[g] + eps * z2)
        minus = plain_loss(X, Y, W1[g] - eps * z1, W2[g] - eps * z2)
        grad = (plus - minus) / (2 * eps)
        assert torch.allclose(loss[g], plain_loss(X, Y, W1[g], W2[g]), rtol=1e-10)
        assert torch.allclose(new1[g], W1[g] - lr_in[g] * grad * z1, rtol=1e-8, atol=1e-12)
        assert torch.allclose(new2[g], W2[g] - lr_out[g] * grad * z2, rtol=1e-8, atol=1e-12)


def test_eggroll_step_is_the_written_out_formula(problem):
    W1, W2 = batch(problem, 2)
    gen = torch.Generator().manual_seed(3)
    K, r, sigma = 4, 2, 0.01  # 4 antithetic pairs, rank 2
    A1, B1 = torch.randn(K, 16, r, generator=gen, dtype=D), torch.randn(K, 16, r, generator=gen, dtype=D)
    A2, B2 = torch.randn(K, 16, r, generator=gen, dtype=D), torch.randn(K, 1, r, generator=gen, dtype=D)
    lr_in, lr_out = torch.tensor([0.01, 0.2], dtype=D), torch.tensor([0.05, 0.001], dtype=D)
    loss, new1, new2 = tm.eggroll_step(problem.X, problem.Y, W1, W2, lr_in, lr_out, A1, B1, A2, B2, sigma)
    X, Y = problem.X, problem.Y
    for g in range(2):
        members = []  # (e1, e2) of each member: +E_k, then -E_k
        for k in range(K):
            E1 = A1[k] @ B1[k].T / math.sqrt(r)
            E2 = (A2[k] @ B2[k].T / math.sqrt(r))[:, 0]
            members += [(E1, E2), (-E1, -E2)]
        F = torch.stack([-plain_loss(X, Y, W1[g] + sigma * e1, W2[g] + sigma * e2) for e1, e2 in members])
        f = (F - F.mean()) / (F.std(unbiased=False) + 1e-8)
        P = len(members)
        g1 = -sum(fi * e1 for fi, (e1, _) in zip(f, members)) / (P * sigma)
        g2 = -sum(fi * e2 for fi, (_, e2) in zip(f, members)) / (P * sigma)
        assert torch.allclose(loss[g], plain_loss(X, Y, W1[g], W2[g]), rtol=1e-10)
        assert torch.allclose(new1[g], W1[g] - lr_in[g] * g1, rtol=1e-8, atol=1e-12)
        assert torch.allclose(new2[g], W2[g] - lr_out[g] * g2, rtol=1e-8, atol=1e-12)


def test_eggroll_estimate_points_down_the_gradient(problem):
    """The sign convention: with many pairs, -g (the step) has a positive dot product with -dL/dW."""
    W1, W2 = batch(problem, 1)
    gen = torch.Generator().manual_seed(4)
    K = 256
    A1, B1 = torch.randn(K, 16, 1, generator=gen, dtype=D), torch.randn(K, 16, 1, generator=gen, dtype=D)
    A2, B2 = torch.randn(K, 16, 1, generator=gen, dtype=D), torch.randn(K, 1, 1, generator=gen, dtype=D)
    one = torch.ones(1, dtype=D)
    _, new1, new2 = tm.eggroll_step(problem.X, problem.Y, W1, W2, one, one, A1, B1, A2, B2, 1e-3)
    _, ref1, ref2 = autograd_of(problem.X, problem.Y, W1[0], W2[0])
    step = torch.cat([(new1 - W1)[0].flatten(), (new2 - W2)[0]])
    grad = torch.cat([ref1.flatten(), ref2])
    assert torch.dot(step, -grad) / (step.norm() * grad.norm()) > 0.3


@pytest.mark.parametrize("optimizer", tm.OPTIMIZERS)
def test_small_lr_converges_for_every_optimizer(optimizer):
    cfg = tm.MapConfig(optimizer=optimizer, size=2, steps=60, x_range=(-3.0, -2.5), y_range=(-3.0, -2.5))
    m = tm.compute_map(cfg)
    assert (m.scores < 0).all(), m.scores


def test_chunks_and_pixels_do_not_mix():
    """Shared noise: chunks of 1 pixel and one chunk of all give the same map."""
    cfg = tm.MapConfig(optimizer="mezo", size=3, steps=15, x_range=(-2.0, 2.0), y_range=(-2.0, 2.0))
    a = tm.compute_map(cfg).scores
    b = tm.compute_map(dataclasses.replace(cfg, chunk=3)).scores  # 3 networks: one pixel a chunk
    assert np.allclose(a, b, rtol=1e-5)


# ---------------------------------------------------------------- the score


def test_gd_tiny_lr_converges_huge_lr_diverges_never_nan():
    small = tm.compute_map(tm.MapConfig(size=4, steps=30, x_range=(-3.0, -2.0), y_range=(-3.0, -2.0)))
    huge = tm.compute_map(tm.MapConfig(size=4, steps=30, x_range=(7.0, 8.0), y_range=(7.0, 8.0)))
    assert (small.scores < 0).all() and small.converged_fraction == 1.0
    assert (huge.scores > 0).all() and huge.converged_fraction == 0.0
    assert np.isfinite(huge.scores).all()


def test_huge_lr_really_produces_non_finite_losses():
    cfg = tm.MapConfig(steps=30)
    problem, _ = tm.make_problem(16, 0)
    lr = torch.full((2,), 1e8)
    loss = tm.train_chunk(cfg, problem, {}, lr, lr)
    assert not torch.isfinite(loss).all()  # so the next test's path is the one a map takes
    scores = tm.convergence_scores(loss)
    assert torch.isfinite(scores).all() and (scores > 0).all()


def test_score_formula():
    T = 30
    fast = torch.full((T,), 0.5).pow(torch.arange(T))  # v_t = 0.5^t
    flat = torch.ones(T)
    boom = torch.tensor([1.0, 10.0, float("inf")] + [float("nan")] * (T - 3))
    zigzag = torch.tensor([1.0, 2.0] * (T // 2))  # averages 1.5 over the last 20: diverged
    s = tm.convergence_scores(torch.stack([fast, flat, boom, zigzag], 1) * 3.0)  # v_t = L_t / L_0
    assert s[0] == pytest.approx(-float(fast.double().sum()))
    assert s[1] == pytest.approx(T)  # the mean of the last 20 is 1, not < 1: diverged, sum 1/v = T
    assert s[2] == pytest.approx(1 + 0.1 + (T - 2) * 3 / 1e6)  # a non-finite loss counts as 1e6
    assert s[3] == pytest.approx(T // 2 * 1.5)
    assert torch.isfinite(s).all()


def test_score_of_a_loss_that_hits_zero_stays_finite():
    loss = torch.tensor([1.0] + [0.0, 3.0] * 20)[:, None]  # oscillates through a perfect fit
    assert torch.isfinite(tm.convergence_scores(loss)).all()


# ---------------------------------------------------------------- box counting


def koch_curve(level: int, width: int) -> np.ndarray:
    """The Koch curve rasterised (dimension log 4 / log 3 = 1.262)."""
    pts = np.array([[0.0, 0.0], [1.0, 0.0]])
    turn = np.array([[0.5, -math.sqrt(3) / 2], [math.sqrt(3) / 2, 0.5]])  # +60 degrees
    for _ in range(level):
        a, third = pts[:-1], (pts[1:] - pts[:-1]) / 3
        p1, p3 = a + third, a + 2 * third
        pts = np.concatenate([np.stack([a, p1, p1 + third @ turn.T, p3], 1).reshape(-1, 2), pts[-1:]])
    t = np.linspace(0, 1, 8)[:, None, None]
    samples = (pts[:-1] + t * (pts[1:] - pts[:-1])).reshape(-1, 2) * (width - 1)
    img = np.zeros((int(samples[:, 1].max()) + 1, width), bool)
    img[samples[:, 1].astype(int), samples[:, 0].astype(int)] = True
    return img


def edge_list(scores):
    return [tuple(int(v) for v in ij) for ij in np.argwhere(tm.edge_pixels(scores))]


def test_edge_pixels_are_sign_changes():
    scores = np.array([[-1.0, -2.0, 3.0], [-1.0, -1.0, 4.0]])
    assert edge_list(scores) == [(0, 1)]


def test_box_dimension_of_a_straight_boundary_is_one():
    y, x = np.mgrid[0:256, 0:256]
    for scores in (np.where(x < 100, -1.0, 1.0), np.where(x + 0.7 * y < 200, -1.0, 1.0)):
        box = tm.box_counting_dimension(tm.edge_pixels(scores))
        assert box["dimension"] == pytest.approx(1.0, abs=0.05), box
        assert box["lstsq"] == pytest.approx(1.0, abs=0.05), box


def test_box_dimension_of_noise_is_two():
    scores = np.random.default_rng(0).choice([-1.0, 1.0], size=(256, 256))
    box = tm.box_counting_dimension(tm.edge_pixels(scores))
    assert box["dimension"] == pytest.approx(2.0, abs=0.02), box


def test_box_dimension_of_the_koch_curve():
    box = tm.box_counting_dimension(koch_curve(6, 729))
    assert box["dimension"] == pytest.approx(math.log(4) / math.log(3), abs=0.05), box


def test_no_boundary_has_no_dimension():
    box = tm.box_counting_dimension(tm.edge_pixels(-np.ones((64, 64))))
    assert box["dimension"] is None and box["edge_pixels"] == 0


def test_zoom_is_centred_on_the_boundary_and_ten_times_narrower():
    xs = ys = np.linspace(0.0, 9.0, 91)  # 0.1 per pixel
    scores = np.where(xs[None, :] < 2.05, -1.0, 1.0).repeat(91, 0)  # boundary between x = 2.0 and 2.1
    m = tm.TrainabilityMap(scores, xs, ys, 0.0, {})
    (x0, x1), (y0, y1) = tm.next_zoom(m)
    assert (x0 + x1) / 2 == pytest.approx(2.05) and (y0 + y1) / 2 == pytest.approx(4.5, abs=0.06)
    assert x1 - x0 == pytest.approx(0.9) and y1 - y0 == pytest.approx(0.9)
    assert tm.next_zoom(tm.TrainabilityMap(-np.ones((4, 4)), xs[:4], ys[:4], 0.0, {})) is None


def test_colours_keep_the_signs_apart():
    scores = np.array([[-5.0, -1.0, 2.0, 30.0]])
    c = tm.equalised_colours(scores)
    assert (c[scores < 0] >= 0.625).all() and (c[scores > 0] <= 0.375).all()


# ---------------------------------------------------------------- the command line


def test_cli_writes_png_json_npz(tmp_path, capsys):
    out = tmp_path / "m"
    rc = main(["map", "--size", "8", "--steps", "20", "--out", str(out), "--zoom-auto", "1"])
    assert rc == 0
    for name in ("map.png", "map.json", "map.npz"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "map.json").read_text())
    assert report["config"]["size"] == 8 and report["config"]["steps"] == 20
    first = report["maps"][0]
    assert first["x_range"] == [-3.0, 6.0] and 0 <= first["converged_fraction"] <= 1
    assert "wall_s" in first and "dimension" in first["box_counting"]
    raw = np.load(out / "map.npz")
    assert raw["scores"].shape == (8, 8) and np.isfinite(raw["scores"]).all()
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("map: gd 8x8, 20 steps") and "converged" in lines[0]
    assert len(report["maps"]) == 2 and (out / "map-zoom1.png").exists()  # the map has a boundary
    x0, x1 = report["maps"][1]["x_range"]
    assert lines[1].startswith("map-zoom1:") and x1 - x0 == pytest.approx(0.9)


def test_cli_zoom_window_and_no_raw(tmp_path, capsys):
    out = tmp_path / "z"
    args = ["map", "--size", "4", "--steps", "5", "--zoom", "1", "2", "0.5", "--no-raw", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "map.json").read_text())
    assert report["maps"][0]["x_range"] == [0.75, 1.25] and report["maps"][0]["y_range"] == [1.75, 2.25]
    assert not (out / "map.npz").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--size", "0"], "--size"),
        (["--size", "-3"], "--size"),
        (["--lr-range", "2", "1"], "--x-range is empty"),
        (["--y-range", "1", "1"], "--y-range is empty"),
        (["--steps", "0"], "--steps"),
        (["--optimizer", "adam"], "--optimizer"),
        (["--population", "7", "--optimizer", "eggroll"], "even"),
        (["--zoom", "1", "1", "-2"], "--zoom"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    out = tmp_path / "never"
    assert main(["map", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nograd: error: ") and needle in err[0], err
    assert not out.exists()  # refused before any work


def test_cli_out_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["map", "--size", "4", "--steps", "2", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nograd: error: cannot create --out"), err


def test_missing_matplotlib_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'nograd\[plot\]'"):
        tm.require_matplotlib()
