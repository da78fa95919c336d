"""The float32 matmul of nograd's forwards without gradients: torch's, or oneDNN's where MKL is slow.

torch's x86 CPU wheels run a float32 ``nn.Linear`` through MKL's sgemm. On CPUs that are not
Intel's, MKL picks a slower code path; oneDNN, which ships in the same wheel and which torch
already uses for bfloat16, does not. On this project's AMD EPYC machine, one thread, plain
inference of the char GPT and of the MLP of ``nograd bench throughput`` ran 1.7-1.9x as fast with
oneDNN's linear (its ``inference_gemm_speedup``; BENCHMARKS.md). bfloat16 is left to torch,
which already calls oneDNN for it.

:func:`linear` is what the population engine (:class:`nograd.core.engine.BatchedPerturbation`)
calls for each layer's shared dense product, and LM-MA-ES for its candidates' products;
``nograd train`` runs every forward that records no gradient through it
(:func:`linears_through`). The backend is chosen once per process, the same
way every time, so a run resumed on the same machine computes with the same kernel as before:

* ``NOGRAD_GEMM=torch`` or ``onednn`` forces one;
* otherwise (``auto``) oneDNN for float32 on a CPU whose vendor is not ``GenuineIntel`` when
  torch links MKL and ships oneDNN's linear, and torch's everywhere else (CUDA: cuBLAS).

The oneDNN call is registered as a custom op, so ``torch.compile`` keeps it as one opaque kernel
and fuses what follows (bias, low-rank term, activation) in its own code. It has no derivative
formulas: with autograd recording, or under ``torch.func`` / forward-mode AD, :func:`linear` is
torch's.

Example:
    >>> import torch
    >>> x, w = torch.randn(8, 4), torch.randn(3, 4)
    >>> torch.allclose(linear(x, w), x @ w.T, atol=1e-5)
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn

# torch.func's transform stack (private; without it, or without custom ops, oneDNN is never used)
_peek_transforms = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)

__all__ = ["ENV_VAR", "addmm_", "backend", "linear", "linears_through", "set_backend"]

ENV_VAR = "NOGRAD_GEMM"
CHOICES = ("auto", "torch", "onednn")

_chosen: str | None = None


def _onednn_linear_available() -> bool:
    return (
        _onednn_linear is not None
        and _peek_transforms is not None
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _cpu_vendor() -> str | None:
    """The x86 vendor string from ``/proc/cpuinfo`` (``GenuineIntel``, ``AuthenticAMD``), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def choose_backend(setting: str | None = None) -> str:
    """The backend for ``setting`` (default: ``$NOGRAD_GEMM``, else ``auto``): ``torch`` or ``onednn``."""
    setting = (os.environ.get(ENV_VAR, "auto") if setting is None else setting).strip().lower() or "auto"
    if setting not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(CHOICES)}, got {setting!r}")
    if setting == "torch" or not _onednn_linear_available():
        return "torch"  # (onednn asked for but not in this torch build: torch's)
    if setting == "onednn":
        return "onednn"
    vendor = _cpu_vendor()
    slow_mkl = torch.backends.mkl.is_available() and vendor is not None and vendor != "GenuineIntel"
    return "onednn" if slow_mkl else "torch"


def backend() -> str:
    """This process's backend for float32 CPU linears, chosen on first use (see the module docstring).

    Call it before ``torch.compile`` traces :func:`linear` (the engine and :func:`linears_through`
    do): the choice reads the environment and ``/proc/cpuinfo``, which a traced graph cannot.
    """
    global _chosen
    if _chosen is None:
        _chosen = choose_backend()
    return _chosen


def set_backend(name: str) -> str:
    """Choose the backend for this process, as ``NOGRAD_GEMM`` would (tests, or a library user)."""
    global _chosen
    _chosen = choose_backend(name)
    return _chosen


def _register_onednn_linear():
    """oneDNN's linear as the custom op ``nograd::onednn_linear`` (None before torch 2.4)."""
    if not hasattr(torch.library, "custom_op"):
        return None

    @torch.library.custom_op("nograd::onednn_linear", mutates_args=())
    def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")

    @onednn_linear.register_fake
    def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    return onednn_linear


_onednn_linear = _register_onednn_linear()


def _differentiating(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records these tensors, or a forward-mode or ``torch.func`` transform is
    active. The custom op has no derivative formulas: under ``torch.func.jvp`` it would silently
    give a zero tangent, so every such case goes to torch's linear."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return True
    if torch.compiler.is_compiling():  # a traced graph: the checks below are for eager transforms
        return False
    return forward_ad._current_level >= 0 or _peek_transforms() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T (+ b)``, as ``F.linear``, through the faster kernel of this machine (see the module)."""
    use_onednn = (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and x.dim() >= 2
        and (_chosen if _chosen is not None else backend()) == "onednn"
        and not _differentiating(x, weight, bias)
    )
    if use_onednn:
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def addmm_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out += a @ b`` in place (``a`` ``(n, k)``, ``b`` ``(k, m)``), through the faster kernel of this
    machine: torch's ``addmm_`` (one pass over ``out``), or oneDNN's product into a buffer, then
    added (MKL's path on other vendors' CPUs is slow for a small inner size ``k``)."""
    if (
        out.device.type == "cpu"
        and out.dtype == a.dtype == b.dtype == torch.float32
        and (_chosen if _chosen is not None else backend()) == "onednn"
        and not _differentiating(out, a, b)
    ):
        return out.add_(_onednn_linear(a, b.T, None))
    return out.addmm_(a, b)


@contextmanager
def linears_through(module: nn.Module) -> Iterator[None]:
    """Within the context, every ``nn.Linear`` of ``module`` computes through :func:`linear`.

    ``nograd train`` wraps a run in it, and the benchmarks their inference yardsticks, so that
    both sides of a ratio use one kernel. Gradient-recording forwards still get torch's linear
    (see :func:`linear`). Layers whose class overrides ``forward``, or whose ``forward`` is
    already patched, are left as they are.
    """
    backend()  # chosen now, not inside a compiled trace
    patched = [
        m
        for m in module.modules()
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and "forward" not in m.__dict__
    ]
    for m in patched:
        m.forward = lambda x, m=m: linear(x, m.weight, m.bias)
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
