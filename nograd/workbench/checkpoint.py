"""Checkpoints that are written atomically and checked when read.

File layout: a ``torch.save`` of ``{"format", "sha256", "payload"}`` where
``payload`` is the ``torch.save`` bytes of the actual state and ``sha256`` its
hex digest. Reading recomputes the digest, so a truncated or bit-flipped file
is reported instead of silently resuming from garbage. Writing goes to a
temporary file in the same folder, is fsynced, then renamed over the old
checkpoint: a crash mid-write leaves the previous checkpoint intact.

Both layers are read with ``torch.load(..., weights_only=True)``: a checkpoint
holds tensors and plain Python values only, never pickled code.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from nograd.core.errors import UsageError

FORMAT = "nograd-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (tensors and plain values) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    wrapper = {"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(wrapper, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # Make the rename itself durable; not every filesystem lets a folder be opened.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Every problem with the file (missing, truncated, corrupted, not ours) is a
    :class:`UsageError` with a one-line message.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist")
    try:
        wrapper = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip/pickle
        raise UsageError(f"checkpoint {str(path)!r} is corrupted or truncated ({_short(e)})") from None
    if not isinstance(wrapper, dict) or wrapper.get("format") != FORMAT:
        raise UsageError(f"{str(path)!r} is not a nograd checkpoint")
    payload = wrapper.get("payload")
    if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != wrapper.get("sha256"):
        raise UsageError(f"checkpoint {str(path)!r} is corrupted (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {str(path)!r} cannot be read ({_short(e)})") from None


def _short(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:120]}" if first else type(e).__name__
