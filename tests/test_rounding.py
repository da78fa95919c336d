"""Stochastic rounding of low-precision weights: unbiased, one of the two neighbours, repeatable,
and what lets MeZO-sized updates move bfloat16 weights at all."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nograd.core.engine import ParamSpace, accumulate
from nograd.core.noise import SMALL, SeededNoise
from nograd.core.rounding import add_rounded_, round_key, scale_rounded_, stochastic_round_
from nograd.zo import MeZO, ZOSign


def neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values of ``dtype`` just below and just above each float32 ``x`` (both
    equal to ``x`` where it is representable), from round-to-nearest and ``nextafter``."""
    nearest = x.to(dtype)
    up = torch.nextafter(nearest, torch.full_like(nearest, float("inf"))).float()
    down = torch.nextafter(nearest, torch.full_like(nearest, -float("inf"))).float()
    n = nearest.float()
    below = torch.where(n <= x, n, down)
    above = torch.where(n >= x, n, up)
    return below, above


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_picks_a_neighbour_and_is_unbiased(dtype):
    torch.manual_seed(0)
    x = torch.randn(4096) * 0.05
    x = torch.where(x.abs() < 2**-14, torch.full_like(x, 2**-14), x)  # float16: its normal range
    draws = torch.stack(
        [stochastic_round_(torch.empty(4096, dtype=dtype), x, round_key(0, k, 0)).float() for k in range(400)]
    )
    below, above = neighbours(x, dtype)
    assert bool(((draws == below) | (draws == above)).all())
    # the mean of 400 draws is within 5 standard errors of x: spacing / 2 / sqrt(400) at most
    spacing = (above - below).clamp_min(1e-12)
    assert bool(((draws.mean(0) - x).abs() <= 5 * spacing / 2 / 20 + 1e-12).all())
    # and the probability of rounding up is the distance from below over the spacing
    frac = (x - below) / spacing
    up = (draws == above).float().mean(0)
    moved = above > below
    assert float((up - frac)[moved].abs().mean()) < 0.03


def test_rounding_is_repeatable_chunk_invariant_and_keeps_non_finite():
    x = torch.randn(10_001) * 0.1
    whole = stochastic_round_(torch.empty(10_001, dtype=torch.bfloat16), x, key=7)
    parts = torch.empty(10_001, dtype=torch.bfloat16)
    for start in (0, 37, 4099):
        end = {0: 37, 37: 4099, 4099: 10_001}[start]
        stochastic_round_(parts[start:end], x[start:end], key=7, start=start)
    assert torch.equal(whole, parts)
    assert torch.equal(whole, stochastic_round_(torch.empty(10_001, dtype=torch.bfloat16), x, key=7))
    assert not torch.equal(whole, stochastic_round_(torch.empty(10_001, dtype=torch.bfloat16), x, key=8))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    out = stochastic_round_(torch.empty(4, dtype=torch.bfloat16), special, key=1).float()
    assert out[0].isnan() and out[1] == float("inf") and out[2] == -float("inf") and out[3] == 0


def test_float32_targets_are_added_to_exactly_as_before():
    torch.manual_seed(0)
    w, d = torch.randn(100), torch.randn(100)
    assert torch.equal(add_rounded_(w.clone(), d, key=3, alpha=-0.1), w.clone().add_(d, alpha=-0.1))
    assert torch.equal(scale_rounded_(w.clone(), 0.99, key=3), w.clone().mul_(0.99))


def test_updates_far_below_the_spacing_add_up_in_bfloat16():
    w = torch.full((20_000,), 0.05, dtype=torch.bfloat16)
    nearest = w.clone()
    for step in range(200):
        add_rounded_(w, torch.full((20_000,), 1e-5), key=round_key(0, step, 0))
        nearest.add_(torch.full((20_000,), 1e-5).to(torch.bfloat16))
    assert torch.equal(nearest, torch.full((20_000,), 0.05, dtype=torch.bfloat16))  # all lost
    assert abs(float(w.float().mean()) - (float(torch.tensor(0.05).bfloat16()) + 200 * 1e-5)) < 2e-5


# one direction: chunk by chunk (MeZO's step); several: summed in one float32 buffer; small and large
@pytest.mark.parametrize("out_features", [256, 4])
@pytest.mark.parametrize("coeffs", [[(0, 2.0)], [(0, 2.0), (1, -1.0)]])
def test_accumulate_update_moves_bfloat16_weights_like_float32(out_features, coeffs):
    torch.manual_seed(0)
    layer = nn.Linear(256, out_features).to(torch.bfloat16)
    exact = nn.Linear(256, out_features)
    exact.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    assert (layer.weight.numel() > SMALL) == (out_features == 256)
    noise, lr = SeededNoise(3), 1e-5  # steps ~1e-5, spacing ~2e-4
    before = layer.weight.detach().float().clone()
    accumulate(ParamSpace(layer), noise, 5, coeffs, lr=lr, into="update")
    accumulate(ParamSpace(exact), noise, 5, coeffs, lr=lr, into="update")
    moved, want = layer.weight.detach().float() - before, exact.weight.detach() - before
    # each weight lands on a neighbour of the exact result, and the update's projection survives
    below, above = neighbours(exact.weight.detach(), torch.bfloat16)
    got = layer.weight.detach().float()
    assert bool(((got == below) | (got == above)).all())
    ratio = float((moved * want).sum() / (want * want).sum())
    assert 0.8 < ratio < 1.2, ratio  # round-to-nearest gives about 0 here


def test_mezo_and_zo_sign_train_bfloat16_weights_with_tiny_steps():
    """Far below the spacing, each step still moves the weights by its exact size in expectation:
    the bf16 run follows the float32 run of the same seeds."""
    torch.manual_seed(0)
    target = torch.randn(64, 64) * 0.05
    for cls, kw in ((MeZO, {"lr": 1e-6, "eps": 1e-2}), (ZOSign, {"lr": 2e-6, "eps": 1e-2})):
        runs = {}
        for dtype in (torch.float32, torch.bfloat16):
            w = nn.Parameter(torch.full((64, 64), 0.05).to(dtype))
            opt = cls([w], seed=0, **kw)
            start = w.detach().float().clone()
            for _ in range(30):
                opt.step(lambda w=w: float((w.float() - target).square().sum()))
            runs[dtype] = w.detach().float() - start
        a, b = runs[torch.float32], runs[torch.bfloat16]
        assert float(a.abs().mean()) < 2.4e-4 / 2  # each step, and the sum, is under half a spacing
        ratio = float((a * b).sum() / (a * a).sum())
        assert 0.7 < ratio < 1.3, (cls.__name__, ratio)


def test_the_rounded_update_reads_shaped_noise_like_the_float32_one():
    """Per-tensor scales of shaped noise apply to the chunked bfloat16 update too (the chunks
    come from ``noise.full_chunks``, which the shaped noise transforms)."""
    from nograd.core.shaped_noise import ShapedNoise

    torch.manual_seed(0)
    layer = nn.Linear(256, 256, bias=False).to(torch.bfloat16)
    exact = nn.Linear(256, 256, bias=False)
    exact.weight.data.copy_(layer.weight.detach().float())
    noise = ShapedNoise(3, directions=8)
    noise.scales[0] = 3.0
    before = layer.weight.detach().float().clone()
    for model in (layer, exact):
        accumulate(ParamSpace(model), noise, 5, [(3, 2.0)], lr=1e-5, into="update")
    moved, want = layer.weight.detach().float() - before, exact.weight.detach() - before
    ratio = float((moved * want).sum() / (want * want).sum())
    assert 0.9 < ratio < 1.1, ratio  # unscaled noise would give about 1/3


def test_a_resumed_bfloat16_mezo_run_rounds_exactly_as_the_uninterrupted_one():
    torch.manual_seed(0)
    target = torch.randn(64, 64) * 0.05
    start = torch.randn(64, 64) * 0.05

    def run(steps: int, state: dict | None = None, weights: torch.Tensor | None = None):
        w = nn.Parameter((start if weights is None else weights).to(torch.bfloat16))
        opt = MeZO([w], lr=1e-6, eps=1e-2, seed=0, weight_decay=0.1)
        if state is not None:
            opt.load_state_dict(state)
        for _ in range(steps):
            opt.step(lambda: float((w.float() - target).square().sum()))
        return w.detach().clone(), opt.state_dict()

    straight, _ = run(6)
    half, state = run(3)
    resumed, _ = run(3, state, half)
    assert torch.equal(straight, resumed)
    assert not torch.equal(straight, start.to(torch.bfloat16))  # the steps moved the weights
