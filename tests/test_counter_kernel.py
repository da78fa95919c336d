"""The ahead-of-time counter kernel: built in a child process, cached, loaded without inductor,
equal to the written formula; rebuilt when its file is damaged; a clear fallback when it cannot be
built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from nograd.core.counter_kernel import counter_gaussians

DRAW = """
import json, sys, warnings
import torch
torch.set_num_threads(1)
from nograd.core.noise import SeededNoise
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    z = SeededNoise(3, "gaussian-counter").full((300_001,), generation=2, member=1, index=4)
torch.save(z, sys.argv[1])
print(json.dumps({"inductor": "torch._inductor" in sys.modules,
                  "warnings": [str(w.message) for w in caught if "gaussian-counter" in str(w.message)]}))
"""


def draw_in_child(tmp_path: Path, cache: Path, **env: str) -> tuple[torch.Tensor, dict]:
    out = tmp_path / "z.pt"
    done = subprocess.run(
        [sys.executable, "-c", DRAW, str(out)],
        env={**os.environ, "NOGRAD_CACHE_DIR": str(cache), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(out, weights_only=True), json.loads(done.stdout.strip().splitlines()[-1])


def expected() -> torch.Tensor:
    """The same draw by the eager formula in this process (no compiled kernel involved)."""
    from nograd.core.noise import BLOCK, SeededNoise

    noise = SeededNoise(3, "gaussian-counter")
    n, parts = 300_001, []
    for block, start in enumerate(range(0, n, BLOCK)):
        size = min(BLOCK, n - start)
        key = noise.key(2, 1, 4, block)
        base = torch.tensor(key - (1 << 64) if key >= 1 << 63 else key)
        parts.append(counter_gaussians(base, (size + 1) // 2)[:size])
    return torch.cat(parts)


def test_kernel_is_built_once_loaded_without_inductor_and_rebuilt_when_damaged(tmp_path):
    cache = tmp_path / "cache"
    z, info = draw_in_child(tmp_path, cache)
    assert not info["inductor"] and not info["warnings"]
    torch.testing.assert_close(z, expected(), atol=1e-5, rtol=1e-5)
    (package,) = cache.glob("*.pt2")
    stamp = package.stat().st_mtime_ns
    again, info = draw_in_child(tmp_path, cache)  # from the cache: same file, same numbers
    assert torch.equal(again, z) and package.stat().st_mtime_ns == stamp and not info["warnings"]
    package.write_bytes(b"not a package")  # damaged: detected, rebuilt, same numbers
    rebuilt, info = draw_in_child(tmp_path, cache)
    assert torch.equal(rebuilt, z) and not info["inductor"] and not info["warnings"]
    assert package.stat().st_size > 1000


def test_an_unusable_cache_falls_back_to_compiling_in_the_process_with_one_warning(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder cannot be made under a file")
    z, info = draw_in_child(tmp_path, blocker / "cache")
    assert len(info["warnings"]) == 1 and "ahead-of-time kernel" in info["warnings"][0]
    torch.testing.assert_close(z, expected(), atol=1e-5, rtol=1e-5)
    off, info = draw_in_child(tmp_path, tmp_path / "unused", NOGRAD_COUNTER_AOT="0")
    assert not info["warnings"] and not (tmp_path / "unused").exists()
    torch.testing.assert_close(off, expected(), atol=1e-5, rtol=1e-5)
