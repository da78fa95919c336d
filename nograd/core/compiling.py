"""A function through ``torch.compile``, or the function itself when compiling fails.

Both the compiled population forward (:class:`nograd.core.engine.BatchedPerturbation`) and the
counter-based noise kernel (:mod:`nograd.core.noise`) want the same thing: compile on the first
call, time that call once, and on a machine where inductor cannot build (no C++ compiler, an
unsupported operation) say so in one warning and go on eagerly with the same function.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

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
