"""The counter-based Gaussian generator, and its kernel compiled ahead of time for the CPU.

:func:`counter_gaussians` is the generator of ``"gaussian-counter"`` noise (see
:mod:`nograd.core.noise`): pair ``i`` of a block is Box-Muller of the uniform bits
``splitmix64(key + i)``. Eagerly it costs 20-50 ns per number; compiled into one kernel, under 1 ns.

``torch.compile`` could build that kernel inside the process, but importing and running
inductor adds about 95 MB to the process whatever the model: for MeZO on a 59M-parameter model
that is 20% of inference memory, the very thing MeZO saves. So on the CPU the kernel is exported
(``torch.export``) and compiled by AOTInductor in a **child process**, once per machine, torch
version and thread count, into a ``.pt2`` package in the cache folder (``$NOGRAD_CACHE_DIR``, else
``~/.cache/nograd``). The process that draws the noise loads the package with torch's C++ runner
(``torch._C._aoti``) and never imports inductor. The package is checked against the eager formula
when loaded; if it cannot be built or loaded (no compiler, an unwritable cache, another torch), the
caller falls back to compiling in the process (:func:`nograd.core.noise._counter_fill`).

The child is ``python -m nograd.core.counter_kernel PACKAGE THREADS``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from .errors import first_line

__all__ = ["BLOCK_PAIRS", "as_int64", "counter_gaussians", "load_cpu_kernel", "mix64"]

BLOCK_PAIRS = 1 << 17  # pairs per call at most: a noise block of 2^18 numbers (noise.BLOCK)
CACHE_ENV = "NOGRAD_CACHE_DIR"
AOT_ENV = "NOGRAD_COUNTER_AOT"  # "0": compile in the process instead (no child, no cache)
BUILD_TIMEOUT_S = 600

_C1, _C2, _C3 = -7046029254386353131, -4658895280553007687, -7723592293110705685  # splitmix64's, as int64


def as_int64(key: int) -> int:
    """A 64-bit key as the signed value an int64 tensor holds (the same 64 bits)."""
    return key - (1 << 64) if key >= 1 << 63 else key


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping products; logical shifts by masking)."""
    x = x * _C1
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _C2
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _C3
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def counter_gaussians(base: torch.Tensor, pairs: int) -> torch.Tensor:
    """``2 * pairs`` Gaussians: ``r cos(t)`` of pairs ``0..pairs-1``, then their ``r sin(t)``, where
    pair ``i``'s uniform bits are ``mix64(base + i)`` (``base``: an int64 scalar tensor)."""
    bits = mix64(torch.arange(pairs, dtype=torch.int64, device=base.device) + base)
    u1 = ((bits >> 40) & 0xFFFFFF).to(torch.float32).add(0.5).mul(1.0 / (1 << 24))  # in (0, 1)
    u2 = ((bits >> 16) & 0xFFFFFF).to(torch.float32).mul(2.0 * 3.141592653589793 / (1 << 24))
    r = torch.sqrt(-2.0 * torch.log(u1))
    return torch.cat([r * torch.cos(u2), r * torch.sin(u2)])


class _Kernel(torch.nn.Module):
    """What is exported: the pair count comes from ``like``'s length, a dynamic dimension."""

    def forward(self, base: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return counter_gaussians(base, like.shape[0])


def _source_hash() -> str:
    text = inspect.getsource(mix64) + inspect.getsource(counter_gaussians) + inspect.getsource(_Kernel)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cpu_flags() -> str:
    """The CPU's feature flags (the kernel is built with ``-march=native``)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.processor() or platform.machine()


def package_path(threads: int) -> Path:
    """Where the package for this torch, this CPU and ``threads`` threads is cached."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nograd")
    tag = hashlib.sha256(f"{torch.__version__}|{sys.version}|{_cpu_flags()}".encode()).hexdigest()[:12]
    return root / f"counter-gaussian-{_source_hash()}-{tag}-t{threads}.pt2"


def build(path: Path, threads: int) -> None:
    """Export and compile the kernel into ``path`` (run in the child process)."""
    import torch._inductor  # only here, in the child

    torch.set_num_threads(threads)
    pairs = torch.export.Dim("pairs", min=1, max=BLOCK_PAIRS)
    example = (torch.tensor(0, dtype=torch.int64), torch.empty(1000))
    program = torch.export.export(_Kernel(), example, dynamic_shapes=({}, {0: pairs}))
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=str(partial))
    os.replace(partial, path)  # atomic: a reader sees a whole package or none


class _Loaded:
    """A loaded package: ``(base, pairs) -> 2 * pairs`` Gaussians, no inductor in this process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runner = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        self.like = torch.empty(BLOCK_PAIRS)  # only its length is read

    def __call__(self, base: torch.Tensor, pairs: int) -> torch.Tensor:
        return self.runner.run([base, self.like[:pairs]])[0]

    def check(self) -> None:
        """The package computes the written formula (a corrupted or stale file does not)."""
        for base, pairs in ((12345, 1), (-(1 << 63), 7), (987654321, 4097)):
            b = torch.tensor(base, dtype=torch.int64)
            got, want = self(b, pairs), counter_gaussians(b, pairs)
            if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
                raise RuntimeError(f"the cached kernel {self.path} does not compute the formula")


_loaded: dict[int, _Loaded | None] = {}  # threads -> kernel (None: could not build or load)


def load_cpu_kernel(threads: int | None = None) -> _Loaded | None:
    """The ahead-of-time CPU kernel for ``threads`` threads (default: torch's count), built in a
    child process on first use and cached; None, with one warning, if that is not possible."""
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads in _loaded:
        return _loaded[threads]
    if os.environ.get(AOT_ENV, "1") == "0":
        _loaded[threads] = None
        return None
    kernel = None
    try:
        path = package_path(threads)  # (no home folder: the fallback below)
        if not path.exists():
            _build_in_child(path, threads)
        try:
            kernel = _Loaded(path)
            kernel.check()
        except Exception:  # a stale or damaged file: build it again, once
            path.unlink(missing_ok=True)
            _build_in_child(path, threads)
            kernel = _Loaded(path)
            kernel.check()
    except Exception as e:
        kernel = None
        warnings.warn(
            f"gaussian-counter: the ahead-of-time kernel could not be built or loaded ({type(e).__name__}: "
            f"{first_line(e)}); compiling it in this process instead (inductor adds about 95 MB)",
            stacklevel=4,
        )
    _loaded[threads] = kernel
    return kernel


def _build_in_child(path: Path, threads: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    with open(lock, "w") as handle:
        with contextlib.suppress(ImportError, OSError):  # one builder per package at a time (POSIX)
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        if path.exists():  # another process built it meanwhile
            return
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        done = subprocess.run(
            [sys.executable, "-m", "nograd.core.counter_kernel", str(path), str(threads)],
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        if done.returncode != 0 or not path.exists():
            lines = (done.stderr or done.stdout or "no output").strip().splitlines()
            raise RuntimeError(f"the build exited with {done.returncode}: {lines[-1] if lines else ''}")


if __name__ == "__main__":
    build(Path(sys.argv[1]), int(sys.argv[2]))
