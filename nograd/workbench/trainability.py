"""Trainability maps: which pairs of learning rates train a tiny network, and how fractal is the edge.

After Sohl-Dickstein (2024), "The boundary of neural network trainability is fractal" (arXiv
2402.06184). Every pixel of a map is one small network, trained from the SAME initial weights on
the SAME data; only its two hyperparameters differ, the learning rate of the input layer (x axis)
and of the output layer (y axis), both on a log10 scale. A pixel is coloured by whether training
converged or diverged and how fast. The boundary between the two regions is where training is
barely stable, and the paper finds it fractal: it keeps its detail as one zooms in.

The network (the paper's mean-field parameterisation, no biases, weights ~ N(0, 1)):

    z1 = X W1 / sqrt(d)          X: N x d,  W1: d x n
    h  = tanh(sqrt(2) z1)
    z2 = h W2 / sqrt(n)          W2: n x 1
    f  = z2 / sqrt(n)            so f = tanh(sqrt(2) X W1 / sqrt(d)) W2 / n
    L  = (1/N) sum_k (f_k - y_k)^2

with d = n = 16 (``width``), so 16*16 + 16 = 272 parameters, and N = 272 points X, y ~ N(0, 1).

Three trainers, one per optimizer (each pixel its own pair of per-layer learning rates):

* ``gd``: full-batch gradient descent, W <- W - lr_layer dL/dW (the paper's map);
* ``mezo``: MeZO / SPSA (Malladi et al. 2023), two forward passes per step (plus the readout's);
* ``eggroll``: EGGROLL (Sarkar et al. 2025, arXiv 2511.16652), low-rank antithetic ES.

The readout of a pixel is the paper's: v_t = L(theta_t) / L(theta_0) for t = 0..T-1 (the loss
before each update), a non-finite value counting as 1e6 and values clipped at 1e6; training
converged iff mean(v over the last 20 steps) < 1, and the score is -sum_t v_t when converged
(more negative: faster) and +sum_t 1/v_t when diverged. Edge pixels are the 2x2 windows where the
score changes sign; their box-counting dimension measures how rough the boundary is.

Example:
    >>> cfg = MapConfig(size=4, steps=20, x_range=(-3.0, -2.0), y_range=(-3.0, -2.0))
    >>> m = compute_map(cfg)
    >>> bool((m.scores < 0).all())   # tiny learning rates: every pixel converges
    True
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

try:  # numpy comes with the plot extra (matplotlib needs it); torch alone does not bring it
    import numpy as np
except ImportError:  # pragma: no cover - the CLI still builds its parser; a map says what to install
    np = None  # type: ignore[assignment]

from nograd.core.errors import UsageError
from nograd.core.options import check_options, option

OPTIMIZERS = ("gd", "mezo", "eggroll")
MAX_VALUE = 1e6  # the paper's cap on v_t (and what a non-finite loss counts as)
LAST = 20  # steps averaged to decide "converged" (averages over oscillations)
LOG10_LR_BOUND = 30.0  # 10**30 still fits float32 with room for the update's products

# ---------------------------------------------------------------- config


@dataclass
class MapConfig:
    """What one trainability map (and its zooms) is computed from."""

    optimizer: str = option("gd", "the optimizer of every pixel", choices=OPTIMIZERS)
    size: int = option(256, "pixels per side of the map", min=2)
    steps: int = option(500, "training steps per pixel (the paper used 500-1000)", min=1)
    x_range: tuple[float, float] = option((-3.0, 6.0), "log10 lr of the input layer", cli=False)
    y_range: tuple[float, float] = option((-3.0, 6.0), "log10 lr of the output layer", cli=False)
    seed: int = option(0, "seed of the initial weights, the data and the noise", min=0)
    width: int = option(16, "hidden width, also the input dimension (the paper: 16)", min=1)
    dtype: str = option(
        "float32", "floating-point type of the training (the paper: float64)", choices=("float32", "float64")
    )
    eps: float = option(1e-3, "MeZO: perturbation scale", above=0)
    sigma: float = option(0.01, "EGGROLL: noise scale", above=0)
    population: int = option(16, "EGGROLL: members per step (antithetic pairs, so even)", min=2)
    rank: int = option(1, "EGGROLL: rank of each perturbation", min=1)
    chunk: int = option(
        256, "networks per batched call; each holds N*width activations (17 KB in float32)", min=1
    )
    zoom_auto: int = option(0, "successive zooms onto the boundary, each 1/10 as wide", min=0)


def check_config(cfg: MapConfig) -> None:
    """Refuse a bad config with a one-line UsageError, before any work starts."""
    check_options(cfg)
    for flag, (lo, hi) in (("--x-range", cfg.x_range), ("--y-range", cfg.y_range)):
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise UsageError(f"{flag} must be finite, got {lo} {hi}")
        if not lo < hi:
            raise UsageError(f"{flag} is empty: LO must be < HI, got {lo:g} {hi:g}")
        if max(abs(lo), abs(hi)) > LOG10_LR_BOUND:
            raise UsageError(f"{flag} must lie within +-{LOG10_LR_BOUND:g} (log10 lr), got {lo:g} {hi:g}")
    if cfg.population % 2:
        raise UsageError(f"--population must be even (antithetic pairs), got {cfg.population}")


def zoom_window(cx: float, cy: float, width: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """The x and y ranges of a square window of side ``width`` (log10 units) centred on (cx, cy)."""
    if not (math.isfinite(cx) and math.isfinite(cy) and math.isfinite(width)) or not width > 0:
        raise UsageError(f"--zoom needs a finite centre and a width > 0, got {cx:g} {cy:g} {width:g}")
    return (cx - width / 2, cx + width / 2), (cy - width / 2, cy + width / 2)


# ---------------------------------------------------------------- the problem: one init, one data set


@dataclass
class Problem:
    """The data and the initial weights every pixel starts from."""

    X: torch.Tensor  # (N, d)
    Y: torch.Tensor  # (N,)
    W1: torch.Tensor  # (d, n)
    W2: torch.Tensor  # (n,): the n x 1 readout, stored as a row


def _gaussian(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    # drawn in float64, then cast: float32 and float64 maps start from the same numbers
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def make_problem(
    width: int, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[Problem, torch.Generator]:
    """Weights W1, W2 ~ N(0, 1), then N = #params points X, y ~ N(0, 1), as in the paper.

    Returns the generator too: the optimizers' noise continues its stream, so the init and the
    data do not depend on the optimizer.
    """
    gen = torch.Generator().manual_seed(seed)
    d = n = width
    W1 = _gaussian(gen, d, n, dtype=dtype)
    W2 = _gaussian(gen, n, dtype=dtype)
    N = d * n + n
    X = _gaussian(gen, N, d, dtype=dtype)
    Y = _gaussian(gen, N, dtype=dtype)
    return Problem(X, Y, W1, W2), gen


# ---------------------------------------------------------------- the network, batched over G networks
#
# Layout, batch first: W1 is (G, d, n) and W2 is (G, n), network g's weights being W1[g], W2[g]. The
# hidden activations are kept transposed, (G, n, N): the data X is shared, so the pre-activations
# of all G networks are ONE matrix product (G*n x d) @ (d x N), and so is the weight gradient
# (G*n x N) @ (N x d); the readout h W2 is a batched vector-matrix product over the N points.
#
# Why by hand, and why a sigmoid: measured on the 2-core CPU (one thread, G = 256, float32, per
# network and step) torch.func.vmap(grad(loss)) took ~34 us, hand-written code with torch.tanh
# ~45 us, this code ~9-10 us. torch's CPU tanh ran at 0.44 Gelem/s against 4.4 for sigmoid, so we
# use tanh(a) = 2 sigmoid(2a) - 1 and 1 - tanh(a)^2 = 4 s (1 - s). torch.compile made the gd step
# another ~1.6x faster but needs a C++ toolchain and ~15 s of compiling per shape; left out. The
# transposed layout made the forward-only losses 1.7-2.5x faster than a (N, G, n) layout (a sum
# over the last 16 numbers is slow; a bmm over 272 contiguous ones is not) at equal gd speed.

SIGMOID_SCALE = 2 * math.sqrt(2)  # sigmoid(2 sqrt(2) z) = (1 + tanh(sqrt(2) z)) / 2


def _sigmoid_hidden(X: torch.Tensor, W1: torch.Tensor) -> torch.Tensor:
    """s = sigmoid(2 sqrt(2) X W1 / sqrt(d)), transposed to (G, n, N); h = tanh(...) = 2 s - 1."""
    G, d, n = W1.shape
    scaled = W1.transpose(1, 2).reshape(G * n, d) * (SIGMOID_SCALE / math.sqrt(d))  # the small tensor
    return torch.sigmoid_(scaled @ X.T).view(G, n, X.shape[0])


def _output(s: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    """f = h W2 / n with h = 2 s - 1, i.e. (2 W2 s - sum W2) / n: s (..., n, N), W2 (..., n) -> (..., N)."""
    n, N = s.shape[-2:]
    sw = torch.bmm(W2.reshape(-1, 1, n), s.reshape(-1, n, N)).view(*W2.shape[:-1], N)
    return (2 * sw - W2.sum(-1, keepdim=True)) / n


def forward(X: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    """f = tanh(sqrt(2) X W1 / sqrt(d)) W2 / n for G networks: W1 (G, d, n), W2 (G, n) -> (G, N)."""
    return _output(_sigmoid_hidden(X, W1), W2)


def losses(X: torch.Tensor, Y: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    """L = (1/N) sum_k (f_k - y_k)^2 of each of the G networks: shape (G,)."""
    return (forward(X, W1, W2) - Y).square().mean(-1)


def perturbed_losses(
    X: torch.Tensor, Y: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, D1: torch.Tensor, D2: torch.Tensor
) -> torch.Tensor:
    """L(W1_g + D1_i, W2_g + D2_i) for each of G networks and each of M shared perturbations: (G, M).

    D1 (M, d, n), D2 (M, n). Since the perturbations are shared, X (W1_g + D1_i) = X W1_g + X D1_i
    is one product for the G networks plus one for the M perturbations, then a broadcast sum, not
    G*M products (EGGROLL's point: perturbing costs little on top of the shared product).
    """
    G, d, n = W1.shape
    M, N = D1.shape[0], X.shape[0]
    scale = SIGMOID_SCALE / math.sqrt(d)
    base = (W1.transpose(1, 2).reshape(G * n, d) * scale) @ X.T
    shift = (D1.transpose(1, 2).reshape(M * n, d) * scale) @ X.T
    s = torch.sigmoid_(base.view(G, 1, n, N) + shift.view(1, M, n, N))  # (G, M, n, N)
    f = _output(s, W2[:, None, :] + D2)  # (G, M, N)
    return (f - Y).square().mean(-1)


def loss_and_grad(
    X: torch.Tensor, Y: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of G networks and its exact gradient, by hand:

        r      = dL/df = (2/N) (f - y)
        dL/dW2 = h^T r / n
        dL/dW1 = X^T [ (r W2^T / n) * (1 - h^2) ] sqrt(2) / sqrt(d)

    Returns (L (G,), dL/dW1 (G, d, n), dL/dW2 (G, n)).
    """
    N, d = X.shape
    G, n = W2.shape
    s = _sigmoid_hidden(X, W1)  # (G, n, N)
    residual = _output(s, W2) - Y  # (G, N)
    loss = residual.square().mean(-1)
    r = residual * (2 / N)
    # h^T r = (2 s - 1) r, summed over the points
    gW2 = (2 * torch.bmm(s, r[:, :, None]).squeeze(-1) - r.sum(-1, keepdim=True)) / n
    # 1 - h^2 = 4 s (1 - s) = 4 (s - s*s); the constants 4 sqrt(2) / (n sqrt(d)) go on the small W2
    dZ = torch.addcmul(s, s, s, value=-1).mul_(r[:, None, :])
    dZ.mul_((W2 * (4 * math.sqrt(2) / (n * math.sqrt(d))))[:, :, None])
    gW1 = (dZ.view(G * n, N) @ X).view(G, n, d).transpose(1, 2)
    return loss, gW1, gW2


# ---------------------------------------------------------------- the three optimizers: one step each
#
# lr_in, lr_out: (G,) learning rates of the input layer (W1) and of the output layer (W2), one pair
# per pixel. Each step returns the loss at the weights it started from (the paper's readout) and
# the updated weights.


def _per_layer(lr_in: torch.Tensor, lr_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return lr_in[:, None, None], lr_out[:, None]  # broadcast onto W1 (G, d, n) and W2 (G, n)


def gd_step(
    X: torch.Tensor,
    Y: torch.Tensor,
    W1: torch.Tensor,
    W2: torch.Tensor,
    lr_in: torch.Tensor,
    lr_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-batch gradient descent: W1 <- W1 - lr_in dL/dW1,  W2 <- W2 - lr_out dL/dW2."""
    loss, gW1, gW2 = loss_and_grad(X, Y, W1, W2)
    a, b = _per_layer(lr_in, lr_out)
    return loss, W1 - a * gW1, W2 - b * gW2


def mezo_step(
    X: torch.Tensor,
    Y: torch.Tensor,
    W1: torch.Tensor,
    W2: torch.Tensor,
    lr_in: torch.Tensor,
    lr_out: torch.Tensor,
    z1: torch.Tensor,
    z2: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MeZO / SPSA (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes").

    With one direction z = (z1 (d, n), z2 (n,)) ~ N(0, I) over all parameters:

        L+ = L(theta + eps z),   L- = L(theta - eps z),   g = (L+ - L-) / (2 eps)
        W1 <- W1 - lr_in g z1,   W2 <- W2 - lr_out g z2

    (g is a scalar per pixel). z is the same for every pixel of the map, so two pixels differ only
    by their learning rates, as in the gd map. Three forward passes: L(theta) is the readout.
    """
    signs = torch.tensor([0.0, eps, -eps], dtype=W1.dtype)  # theta, theta + eps z, theta - eps z
    L = perturbed_losses(X, Y, W1, W2, signs[:, None, None] * z1, signs[:, None] * z2)  # (G, 3)
    g = (L[:, 1] - L[:, 2]) / (2 * eps)  # (G,)
    a, b = _per_layer(lr_in * g, lr_out * g)
    return L[:, 0], W1 - a * z1, W2 - b * z2


def lowrank_noise(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """EGGROLL's perturbations E_k = A_k B_k^T / sqrt(r): A (K, m, r), B (K, c, r) -> (K, m, c)."""
    return A @ B.transpose(1, 2) / math.sqrt(A.shape[-1])


def zscore(F: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(F_i - mean F) / (std F + eps) over the population (last dim); population std."""
    centred = F - F.mean(-1, keepdim=True)
    return centred / (centred.square().mean(-1, keepdim=True).sqrt() + eps)


def eggroll_step(
    X: torch.Tensor,
    Y: torch.Tensor,
    W1: torch.Tensor,
    W2: torch.Tensor,
    lr_in: torch.Tensor,
    lr_out: torch.Tensor,
    A1: torch.Tensor,
    B1: torch.Tensor,
    A2: torch.Tensor,
    B2: torch.Tensor,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EGGROLL (Sarkar et al. 2025, "Evolution Strategies at the Hyperscale", arXiv 2511.16652).

    For each weight matrix (W1: d x n, W2: n x 1) and each antithetic pair k = 1..P/2, a rank-r
    perturbation E_k = A_k B_k^T / sqrt(r) (A1 (P/2, d, r), B1 (P/2, n, r), A2 (P/2, n, r),
    B2 (P/2, 1, r)). Members 2k-1, 2k are theta + sigma E_k and theta - sigma E_k: member i is
    theta + sigma e_i with e_i = +-E_k. Fitness F_i = -L(member i) (lower loss is better),
    z-scored over each pixel's population: f_i = (F_i - mean F) / (std F + 1e-8). Then

        g = -(1 / (P sigma)) sum_i f_i e_i          (an estimate of dL/dW)
        W <- W - lr_layer g   ( = W + lr_layer (1/(P sigma)) sum_i f_i e_i: ascent on the fitness)

    so the step descends the loss. The noise is the same for every pixel. P + 1 forward passes:
    L(theta) is the readout.
    """
    G, d, n = W1.shape
    E1, E2 = lowrank_noise(A1, B1), lowrank_noise(A2, B2)[..., 0]  # (K, d, n), (K, n)
    signs = torch.tensor([1.0, -1.0], dtype=W1.dtype)
    e1 = (E1[:, None] * signs[:, None, None]).reshape(-1, d, n)  # +E_1, -E_1, +E_2, -E_2, ...
    e2 = (E2[:, None] * signs[:, None]).reshape(-1, n)
    P = e1.shape[0]
    # member 0 is theta itself (the readout), members 1..P the population
    D1 = torch.cat([torch.zeros(1, d, n, dtype=W1.dtype), sigma * e1])  # (P+1, d, n)
    D2 = torch.cat([torch.zeros(1, n, dtype=W1.dtype), sigma * e2])  # (P+1, n)
    L = perturbed_losses(X, Y, W1, W2, D1, D2)  # (G, P+1)
    f = zscore(-L[:, 1:])  # (G, P)
    g1 = -torch.einsum("gp,pdn->gdn", f, e1) / (P * sigma)
    g2 = -(f @ e2) / (P * sigma)
    a, b = _per_layer(lr_in, lr_out)
    return L[:, 0], W1 - a * g1, W2 - b * g2


# ---------------------------------------------------------------- training a chunk of pixels


def draw_noise(cfg: MapConfig, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every step's noise, drawn once and shared by all pixels (and chunks, and zooms)."""
    d = n = cfg.width
    T = cfg.steps
    if cfg.optimizer == "mezo":
        return {"z1": _gaussian(gen, T, d, n, dtype=dtype), "z2": _gaussian(gen, T, n, dtype=dtype)}
    if cfg.optimizer == "eggroll":
        K, r = cfg.population // 2, cfg.rank
        return {
            "A1": _gaussian(gen, T, K, d, r, dtype=dtype),
            "B1": _gaussian(gen, T, K, n, r, dtype=dtype),
            "A2": _gaussian(gen, T, K, n, r, dtype=dtype),
            "B2": _gaussian(gen, T, K, 1, r, dtype=dtype),
        }
    return {}


def forwards_per_step(cfg: MapConfig) -> int:
    """Networks evaluated per pixel and step: the batched calls hold ``chunk`` of them."""
    return {"gd": 1, "mezo": 3, "eggroll": cfg.population + 1}[cfg.optimizer]


def train_chunk(
    cfg: MapConfig,
    problem: Problem,
    noise: dict[str, torch.Tensor],
    lr_in: torch.Tensor,
    lr_out: torch.Tensor,
) -> torch.Tensor:
    """Train G networks (one per pair lr_in[g], lr_out[g]) for cfg.steps; the losses (T, G)."""
    G = lr_in.shape[0]
    X, Y = problem.X, problem.Y
    W1 = problem.W1.repeat(G, 1, 1)  # every pixel starts from the same weights
    W2 = problem.W2.repeat(G, 1)
    out = torch.empty(cfg.steps, G, dtype=X.dtype)
    for t in range(cfg.steps):
        if cfg.optimizer == "gd":
            out[t], W1, W2 = gd_step(X, Y, W1, W2, lr_in, lr_out)
        elif cfg.optimizer == "mezo":
            out[t], W1, W2 = mezo_step(X, Y, W1, W2, lr_in, lr_out, noise["z1"][t], noise["z2"][t], cfg.eps)
        else:
            A1, B1, A2, B2 = (noise[k][t] for k in ("A1", "B1", "A2", "B2"))
            out[t], W1, W2 = eggroll_step(X, Y, W1, W2, lr_in, lr_out, A1, B1, A2, B2, cfg.sigma)
    return out


# ---------------------------------------------------------------- the readout


def convergence_scores(loss: torch.Tensor) -> torch.Tensor:
    """The paper's score of each trajectory, loss (T, G) -> (G,) float64, never NaN.

    v_t = L_t / L_0   (non-finite -> 1e6, then clipped at 1e6)
    converged = mean(v_{T-20..T-1}) < 1
    score = -sum_t v_t if converged else +sum_t 1/v_t
    """
    v = loss.double()
    v = torch.where(torch.isfinite(v), v, MAX_VALUE)
    v = v / v[0]
    v = torch.where(torch.isfinite(v), v, MAX_VALUE).clamp(max=MAX_VALUE)
    converged = v[-LAST:].mean(0) < 1
    # 1/v: v may reach 0 on the diverged side (an oscillation through a perfect fit); keep it finite
    inverse = (1 / v.clamp(min=1 / MAX_VALUE)).sum(0)
    return torch.where(converged, -v.sum(0), inverse)


# ---------------------------------------------------------------- fractal dimension by box counting


def edge_pixels(scores: np.ndarray) -> np.ndarray:
    """The boundary: the 2x2 windows holding both a converged and a diverged pixel, (H-1, W-1)."""
    s = np.sign(scores)
    windows = np.stack([s[1:, 1:], s[:-1, 1:], s[1:, :-1], s[:-1, :-1]])
    return windows.max(0) * windows.min(0) < 0


def box_counts(edges: np.ndarray, sizes: list[int]) -> list[int]:
    """For each box side s: how many boxes of a grid of s x s boxes hold at least one edge pixel."""
    counts = []
    H, W = edges.shape
    for s in sizes:
        padded = np.zeros((-(-H // s) * s, -(-W // s) * s), dtype=bool)
        padded[:H, :W] = edges
        boxes = padded.reshape(padded.shape[0] // s, s, padded.shape[1] // s, s).any(axis=(1, 3))
        counts.append(int(boxes.sum()))
    return counts


def box_counting_dimension(edges: np.ndarray) -> dict[str, Any]:
    """Box-counting dimension of a set of pixels: the slope of log N(s) against log(1/s).

    Box sides s = 1, 2, 4, ... up to a quarter of the shorter side (at least 4 boxes across).
    ``dimension`` is the median of the local slopes between consecutive sizes,
    (log N(s) - log N(2s)) / log 2, as the paper's own estimate does; ``lstsq`` is the
    least-squares slope over all sizes. None where there is no edge or fewer than two sizes.
    """
    sizes = [2**k for k in range(32) if 2**k <= min(edges.shape) / 4]
    result: dict[str, Any] = {
        "dimension": None,
        "lstsq": None,
        "method": "median of local slopes of log N(s) vs log(1/s), s = 1, 2, 4, ... <= side/4",
        "edge_pixels": int(edges.sum()),
        "sizes": sizes,
        "counts": [],
        "local_slopes": [],
    }
    if not edges.any() or len(sizes) < 2:
        return result
    counts = box_counts(edges, sizes)
    logs, logn = np.log(np.array(sizes, float)), np.log(np.array(counts, float))
    local = -np.diff(logn) / np.diff(logs)
    result.update(
        dimension=float(np.median(local)),
        lstsq=float(-np.polyfit(logs, logn, 1)[0]),
        counts=counts,
        local_slopes=[round(float(x), 4) for x in local],
    )
    return result


# ---------------------------------------------------------------- a map


@dataclass
class TrainabilityMap:
    """Scores on a grid: scores[i, j] is the pixel of x = xs[j] (input-layer) and y = ys[i]."""

    scores: np.ndarray  # (size, size) float64; < 0 converged, > 0 diverged
    xs: np.ndarray  # log10 lr of the input layer, one per column
    ys: np.ndarray  # log10 lr of the output layer, one per row
    wall_s: float
    box: dict[str, Any]
    cpu_s: float = 0.0  # this process's CPU time: the wall time less what other jobs took

    @property
    def converged_fraction(self) -> float:
        return float((self.scores < 0).mean())


def compute_map(
    cfg: MapConfig,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainabilityMap:
    """Train cfg.size^2 networks over the window (default: cfg's ranges) and score them.

    ``progress(done, total)`` is called after each chunk of pixels.
    """
    x_range, y_range = x_range or cfg.x_range, y_range or cfg.y_range
    dtype = getattr(torch, cfg.dtype)
    start, start_cpu = time.perf_counter(), time.process_time()
    problem, gen = make_problem(cfg.width, cfg.seed, dtype)
    noise = draw_noise(cfg, gen, dtype)
    xs = np.linspace(*x_range, cfg.size)
    ys = np.linspace(*y_range, cfg.size)
    # pixel p = i * size + j  <->  (y = ys[i], x = xs[j]); lr = 10^x computed in float64
    lr_in = torch.from_numpy(np.tile(10.0**xs, cfg.size)).to(dtype)
    lr_out = torch.from_numpy(np.repeat(10.0**ys, cfg.size)).to(dtype)
    total = cfg.size * cfg.size
    per_chunk = max(1, cfg.chunk // forwards_per_step(cfg))
    scores = np.empty(total)
    # Saturated units make sigmoid's exp(-a) subnormal, and subnormals cost ~4x: sigmoid ran at
    # 1.25 Gelem/s on pre-activations ~100 against 4.7 when they are flushed to zero. Flushing changes
    # nothing above 1e-38. torch has no getter for the flag: it goes back to torch's default, off.
    torch.set_flush_denormal(True)
    try:
        for lo in range(0, total, per_chunk):
            hi = min(total, lo + per_chunk)
            loss = train_chunk(cfg, problem, noise, lr_in[lo:hi], lr_out[lo:hi])
            scores[lo:hi] = convergence_scores(loss).numpy()  # keep scores only: memory stays per chunk
            if progress:
                progress(hi, total)
    finally:
        torch.set_flush_denormal(False)
    scores = scores.reshape(cfg.size, cfg.size)
    box = box_counting_dimension(edge_pixels(scores))
    return TrainabilityMap(scores, xs, ys, time.perf_counter() - start, box, time.process_time() - start_cpu)


def next_zoom(m: TrainabilityMap) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """A window 1/10 as wide, centred on the edge pixel nearest the map's centre (None: no edge)."""
    edges = np.argwhere(edge_pixels(m.scores))  # (k, 2) rows i, cols j of 2x2 windows
    if not len(edges):
        return None
    centre = (np.array(m.scores.shape) - 1) / 2
    i, j = edges[np.argmin(((edges + 0.5 - centre) ** 2).sum(1))] + 0.5  # window centre, in pixels
    dx, dy = m.xs[1] - m.xs[0], m.ys[1] - m.ys[0]
    cx, cy = m.xs[0] + j * dx, m.ys[0] + i * dy
    wx, wy = (m.xs[-1] - m.xs[0]) / 10, (m.ys[-1] - m.ys[0]) / 10
    return (cx - wx / 2, cx + wx / 2), (cy - wy / 2, cy + wy / 2)


# ---------------------------------------------------------------- colours and the picture


def equalised_colours(scores: np.ndarray, gap: float = 0.25) -> np.ndarray:
    """Colour values in [0, 1]: histogram-equalised separately for each sign (the paper's look).

    Diverged pixels fill [0, 0.5 - gap/2] and converged ones [0.5 + gap/2, 1], each ordered by rank,
    so the two sides of the boundary always differ by at least ``gap``. Near the boundary |score|
    is largest (about T: the loss ratio stays near 1), so those pixels sit next to the gap.
    """
    colours = np.full(scores.shape, 0.5)
    half = (1 - gap) / 2
    for sign in (-1, 1):
        mask = np.sign(scores) == sign
        if not mask.any():
            continue
        ranks = np.argsort(np.argsort(np.abs(scores[mask]))) / max(1, mask.sum() - 1)  # 0 .. 1
        colours[mask] = 0.5 - sign * (gap / 2 + half * (1 - ranks))
    return colours


def require_matplotlib() -> None:
    """Raise a UsageError saying how to install matplotlib (and numpy) when they are missing."""
    try:
        import matplotlib  # noqa: F401
        import numpy  # noqa: F401
    except ImportError:
        raise UsageError("nograd map draws PNGs with matplotlib: pip install 'nograd[plot]'") from None


def plot_map(m: TrainabilityMap, path: str | os.PathLike, title: str) -> None:
    """The map as a PNG: Spectral colours (blue: converged, red: diverged), axes in log10 lr."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    dx, dy = m.xs[1] - m.xs[0], m.ys[1] - m.ys[0]
    extent = (m.xs[0] - dx / 2, m.xs[-1] + dx / 2, m.ys[0] - dy / 2, m.ys[-1] + dy / 2)
    fig, ax = plt.subplots(figsize=(6.2, 6.2), dpi=100)
    ax.imshow(
        equalised_colours(m.scores),
        cmap="Spectral",
        vmin=0,
        vmax=1,
        origin="lower",
        extent=extent,
        interpolation="nearest",
        aspect="auto",
    )
    ax.set_xlabel("log10 learning rate, input layer (W1)")
    ax.set_ylabel("log10 learning rate, output layer (W2)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- the command: maps, files, summary


def prepare_out(out: str | os.PathLike) -> None:
    """Create the output folder, or raise a one-line UsageError if it cannot be written."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {os.fspath(out)!r}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to --out {os.fspath(out)!r}")


def _fmt_dim(box: dict[str, Any]) -> str:
    return "n/a" if box["dimension"] is None else f"{box['dimension']:.2f}"


def run_maps(
    cfg: MapConfig,
    out: str | os.PathLike,
    raw: bool = True,
    log: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Compute the map and cfg.zoom_auto zooms; write map[-zoomK].png (+ .npz with ``raw``) and map.json.

    Every file goes to ``out``; ``log`` gets one summary line per map. Returns the maps' records
    (also in map.json, with the config, the torch version and the thread count).
    """
    check_config(cfg)
    require_matplotlib()
    prepare_out(out)
    records: list[dict[str, Any]] = []
    window: tuple[tuple[float, float], tuple[float, float]] | None = (cfg.x_range, cfg.y_range)
    for k in range(cfg.zoom_auto + 1):
        if window is None:
            log(f"zoom {k}: the previous map has no boundary, no zoom to centre on; stopping")
            break
        name = "map" if k == 0 else f"map-zoom{k}"
        m = compute_map(cfg, *window, progress=_named(progress, name))
        record = _record(name, m, raw)
        title = (
            f"{cfg.optimizer}, {cfg.steps} steps, {cfg.size}x{cfg.size}"
            + (f", zoom {k}" if k else "")
            + f"\nbox-counting dimension {_fmt_dim(m.box)}, converged {m.converged_fraction:.1%}"
        )
        plot_map(m, os.path.join(out, record["png"]), title)
        if raw:
            np.savez_compressed(os.path.join(out, record["raw"]), scores=m.scores, x=m.xs, y=m.ys)
        records.append(record)
        _write_json(cfg, records, out)  # after every map: an interrupted run keeps what it made
        log(_summary(cfg, record, out))
        window = next_zoom(m) if k < cfg.zoom_auto else None
    return records


def _write_json(cfg: MapConfig, records: list[dict[str, Any]], out: str | os.PathLike) -> None:
    report = {
        "config": asdict(cfg),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "maps": records,
    }
    with open(os.path.join(out, "map.json"), "w") as f:
        json.dump(report, f, indent=2)


def _named(progress: Callable[[str, int, int], None] | None, name: str) -> Callable[[int, int], None] | None:
    return None if progress is None else lambda done, total: progress(name, done, total)


def _record(name: str, m: TrainabilityMap, raw: bool) -> dict[str, Any]:
    return {
        "name": name,
        "png": f"{name}.png",
        "raw": f"{name}.npz" if raw else None,
        "x_range": [float(m.xs[0]), float(m.xs[-1])],
        "y_range": [float(m.ys[0]), float(m.ys[-1])],
        "wall_s": round(m.wall_s, 3),
        "cpu_s": round(m.cpu_s, 3),
        "converged_fraction": round(m.converged_fraction, 6),
        "box_counting": m.box,
    }


def _summary(cfg: MapConfig, record: dict[str, Any], out: str | os.PathLike) -> str:
    (x0, x1), (y0, y1) = record["x_range"], record["y_range"]
    return (
        f"{record['name']}: {cfg.optimizer} {cfg.size}x{cfg.size}, {cfg.steps} steps, "
        f"x [{x0:.4g}, {x1:.4g}], y [{y0:.4g}, {y1:.4g}]: {record['converged_fraction']:.1%} converged, "
        f"box dim {_fmt_dim(record['box_counting'])}, {record['wall_s']:.1f} s "
        f"(cpu {record['cpu_s']:.1f} s) -> {os.path.join(out, record['png'])}"
    )
