"""nograd.core.allocator: freed memory is reused instead of faulted in again (glibc)."""

import argparse
import json
import os
import statistics
import subprocess
import sys

import pytest

from nograd.core import allocator

PROBE = """
import json, resource, sys, torch
from nograd.core.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
faults = []
for _ in range(16):  # like a training step: the same few activations made, written and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(4 * 2**20)
    b = torch.ones(16 * 2**20)
    c = a + 1
    del a, b, c
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


glibc = pytest.mark.skipif(not _is_glibc(), reason="mallopt tuning is glibc-only")


def _probe(mode: str, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_retained_memory_is_reused_without_page_faults() -> None:
    pages = 24 * 2**20 * 4 // 4096  # 24576 pages of 4 KiB written per step
    default = _probe("default")
    retained = _probe("retain")
    assert retained["applied"] is True
    # glibc's default maps and unmaps fresh blocks each step: most pages fault again
    assert statistics.median(default["faults"][-8:]) > pages // 2
    # retained: once the heap has grown, a typical step reuses its pages (the heap may still
    # grow now and then, hence the median)
    assert statistics.median(retained["faults"][-8:]) < pages // 20


@glibc
def test_opt_out_by_environment() -> None:
    assert _probe("retain", {allocator.ENV_VAR: "0"})["applied"] is False


@pytest.mark.parametrize(
    ("optimizer", "retained"), [("eggroll", True), ("snes", True), ("mezo", False), ("adamw", False)]
)
def test_training_retains_for_populations_only(
    optimizer: str, retained: bool, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evolution strategies keep freed memory; zeroth-order methods (inference memory) and
    gradient baselines keep glibc's defaults."""
    import nograd.workbench.loop as train_mod
    from nograd.workbench import make_config

    calls = []
    monkeypatch.setattr(train_mod, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(train_mod, "get_task", lambda name: (_ for _ in ()).throw(RuntimeError("stop")))
    cfg = make_config(optimizer=optimizer, out=str(tmp_path), data=str(tmp_path / "unused.txt"))
    with pytest.raises(RuntimeError, match="stop"):  # stop right after the process-wide settings
        train_mod.train(cfg)
    assert calls == ([1] if retained else [])


def test_population_benches_retain(monkeypatch: pytest.MonkeyPatch) -> None:
    import nograd.bench
    import nograd.core.allocator
    from nograd.cli import cmd_bench

    calls = []
    monkeypatch.setattr(nograd.core.allocator, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(nograd.bench, "get", lambda name: lambda argv: {"ok": True})
    for name, expected in (("throughput", 1), ("es", 2), ("memory", 2)):
        assert cmd_bench(argparse.Namespace(name=name, options=[])) == 0
        assert len(calls) == expected  # memory measures peak RSS: glibc's defaults there
