"""Helpers shared by the foundation tests (data paths, tiny configs, running the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shakespeare_path() -> Path:
    """The real Tiny Shakespeare file, or skip the test."""
    candidates = [os.environ.get("NOGRAD_DATA"), REPO.parent / "shared" / "data" / "tinyshakespeare.txt"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    pytest.skip("tinyshakespeare.txt not found (set NOGRAD_DATA or put it at ../shared/data/)")


def small_text(tmp_path: Path) -> Path:
    """A ~30k-character text file that needs no download, for fast training tests."""
    lines = [
        "First Citizen:\nBefore we proceed any further, hear me speak.\n",
        "All:\nSpeak, speak.\n",
        "MENENIUS:\nWhat work's, my countrymen, in hand? where go you?\n",
        "ROMEO:\nBut, soft! what light through yonder window breaks?\n",
    ]
    path = tmp_path / "tiny.txt"
    path.write_text("".join(lines[i % len(lines)] for i in range(400)))
    return path


TINY_GPT = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_batches=2)
"""The shakespeare-char flags of a model that trains a few steps in well under a second."""


def tiny_config(tmp_path: Path, **overrides):
    """A TrainConfig for a model small enough to train a few steps in well under a second."""
    from nograd.workbench import make_config

    base = dict(
        data=str(small_text(tmp_path)),
        out=str(tmp_path / "run"),
        **TINY_GPT,
        steps=6,
        eval_every=3,
        warmup=2,
        quiet=True,
        sample_chars=20,
    )
    base.update(overrides)
    return make_config(**base)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m nograd ARGS`` in a fresh process, from the repo root."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "nograd", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full_env,
        timeout=120,
    )
