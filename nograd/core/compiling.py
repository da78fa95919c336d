"""A function through ``torch.compile``, or the function itself when compiling fails; and the
activations a compiled CPU graph should leave to ATen.

Both the compiled population forward (:class:`nograd.core.engine.BatchedPerturbation`) and the
counter-based noise kernel (:mod:`nograd.core.noise`) want the same thing: compile on the first
call, time that call once, and on a machine where inductor cannot build (no C++ compiler, an
unsupported operation) say so in one warning and go on eagerly with the same function.

:func:`gelus_through_aten`: inductor's C++ code computes GELU's ``erf`` with a vectorised routine
that, on the Intel CPU of BENCHMARKS.md, made the fused GELU kernel of the char GPT's MLP 1.6x the
time of ATen's own GELU kernel (which is bound by memory there). Kept as one opaque ATen call in
the compiled population, the char GPT's compiled generation took 360.6 ms instead of 375.0 ms
(1.04x; an ad hoc A/B in one process, BENCHMARKS.md).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nograd.core.errors import first_line


class CompiledOrEager:
    """Call ``fn`` through ``torch.compile(fn, **options)``; after a failure, call ``fn`` itself.

    ``first_call_seconds`` is the first successful compiled call's time (it includes compiling);
    ``failed`` turns True, with one warning naming ``what`` failed and ``instead`` what happens now.
    """

    def __init__(
        self, fn: Callable, what: str = "", instead: str = "using eager", stacklevel: int = 3, **options: Any
    ) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, **options)
        self.what, self.instead, self.stacklevel = what, instead, stacklevel
        self.failed = False
        self.first_call_seconds: float | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed:
            return self.fn(*args, **kwargs)
        start = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # a missing compiler or an unsupported operation: eager from now on
            self.failed = True
            where = f" for {self.what}" if self.what else ""
            warnings.warn(
                f"torch.compile failed{where} ({type(e).__name__}: {first_line(e)}); {self.instead}",
                stacklevel=self.stacklevel,
            )
            return self.fn(*args, **kwargs)
        if self.first_call_seconds is None:
            self.first_call_seconds = time.perf_counter() - start
        return out


def _register_aten_gelu():
    """ATen's GELU as the custom op ``nograd::gelu``: opaque to the compiler (None before torch 2.4)."""
    if not hasattr(torch.library, "custom_op"):
        return None

    @torch.library.custom_op("nograd::gelu", mutates_args=())
    def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
        return F.gelu(x, approximate=approximate)

    @gelu.register_fake
    def _(x: torch.Tensor, approximate: str) -> torch.Tensor:
        return torch.empty_like(x)

    return gelu


_aten_gelu = _register_aten_gelu()


@contextmanager
def gelus_through_aten(module: nn.Module, forwards: dict[int, Callable] | None = None) -> Iterator[None]:
    """Within the context, ``module``'s ``nn.GELU`` layers on the CPU call ATen's GELU kernel as one
    opaque operation, so a compiled graph does not compute it with its own ``erf`` (module
    docstring). The same function, the same numbers as eager; other devices are left alone.
    ``forwards`` (layer id -> forward) keeps each layer's forward the same object from one context
    to the next, so a graph compiled in one is not traced again in the next."""
    forwards = {} if forwards is None else forwards
    patched = [
        m
        for m in module.modules()
        if isinstance(m, nn.GELU) and type(m).forward is nn.GELU.forward and "forward" not in m.__dict__
    ]
    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    if _aten_gelu is None or not on_cpu:
        patched = []
    for m in patched:
        if id(m) not in forwards:
            forwards[id(m)] = lambda x, m=m: _aten_gelu(x, m.approximate)
        m.forward = forwards[id(m)]
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
