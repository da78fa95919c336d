"""Stochastic rounding: small updates to bfloat16 / float16 weights that are not lost.

A zeroth-order step changes a weight by ``lr * g * z``: about 1e-6 to 1e-5 for MeZO. A bfloat16
weight of 0.05 has a spacing of 2.4e-4 between neighbours, so round-to-nearest sends almost every
such update back to the old value, and the model does not train. Rounding up or down at random,
up with probability equal to the distance from the lower neighbour over the spacing, makes the
rounded weight equal the exact sum in expectation (Gupta et al. 2015, "Deep Learning with Limited
Numerical Precision"), so the updates add up over steps.

The float32 sum is rounded by adding ``k`` random bits to the ``k`` low bits of its pattern and
clearing them (``k`` = 16 for bfloat16, 13 for float16; the result is then exactly representable,
for float16 in its normal range). The random bits are counter-based (splitmix64 of ``key +
position``, four 16-bit lanes per number), so a step is repeatable: resuming from a checkpoint
rounds exactly as the uninterrupted run did, and the bits of an element do not depend on how the
tensor was split into chunks. float32 and float64 targets are added to as usual.

Example:
    >>> w = torch.full((10_000,), 0.05, dtype=torch.bfloat16)
    >>> for step in range(100):
    ...     add_rounded_(w, torch.full((10_000,), 1e-5), key=round_key(0, step, 0))
    >>> abs(w.float().mean().item() - (0.05 + 100 * 1e-5)) < 2e-5  # nearest rounding: stays at 0.05
    True
"""

from __future__ import annotations

import torch

from .counter_kernel import as_int64, mix64
from .noise import derive_key

__all__ = ["ROUNDED_BITS", "add_rounded_", "round_key", "scale_rounded_", "stochastic_round_"]

ROUNDED_BITS = {torch.bfloat16: 16, torch.float16: 13}  # float32 mantissa bits each dtype drops
_ROUND_TAG = (1 << 64) - 3  # never a generation/member/index/block key of the noise


def round_key(seed: int, generation: int, index: int, kind: int = 0) -> int:
    """The rounding key of tensor ``index`` at step ``generation`` (``kind`` tells apart two
    roundings of one tensor in one step, such as weight decay and the update)."""
    return derive_key(seed, generation, index, kind, _ROUND_TAG)


def _random_low_bits(n: int, start: int, key: int, bits: int, device: torch.device) -> torch.Tensor:
    """``bits`` uniform random bits (int32) for the elements ``start .. start + n - 1`` of a tensor."""
    first, last = start // 4, (start + n + 3) // 4
    counter = torch.arange(first, last, dtype=torch.int64, device=device)
    lanes = mix64(counter + as_int64(key)).view(torch.int16)
    offset = start - 4 * first
    return lanes[offset : offset + n].to(torch.int32) & ((1 << bits) - 1)


def stochastic_round_(target: torch.Tensor, value: torch.Tensor, key: int, start: int = 0) -> torch.Tensor:
    """``target <- value`` (float32) rounded stochastically to ``target``'s dtype; other dtypes are
    copied as usual. ``start`` is the position of ``value[0]`` in the whole tensor (for chunks)."""
    bits = ROUNDED_BITS.get(target.dtype)
    if bits is None:
        return target.copy_(value)
    flat = value.reshape(-1).to(torch.float32).contiguous()
    noise = _random_low_bits(flat.numel(), start, key, bits, flat.device)
    rounded = ((flat.view(torch.int32) + noise) & -(1 << bits)).view(torch.float32)
    # NaN and inf keep their value: carrying into an all-ones exponent would change them
    rounded = torch.where(torch.isfinite(flat), rounded, flat)
    return target.copy_(rounded.view(target.shape))


def add_rounded_(
    target: torch.Tensor, delta: torch.Tensor, key: int, alpha: float = 1.0, start: int = 0
) -> torch.Tensor:
    """``target += alpha * delta``, computed in float32 and rounded stochastically when ``target``
    is bfloat16 or float16 (exactly as ``add_`` otherwise)."""
    if target.dtype not in ROUNDED_BITS:
        return target.add_(delta.to(target.dtype), alpha=alpha)
    exact = target.to(torch.float32).add_(delta.to(torch.float32), alpha=alpha)
    return stochastic_round_(target, exact, key, start)


def scale_rounded_(target: torch.Tensor, factor: float, key: int) -> torch.Tensor:
    """``target *= factor`` (weight decay), rounded stochastically for bfloat16 / float16."""
    if target.dtype not in ROUNDED_BITS:
        return target.mul_(factor)
    return stochastic_round_(target, target.to(torch.float32).mul_(factor), key)
