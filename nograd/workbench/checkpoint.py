"""Checkpoints that are written atomically and checked when read.

File layout (v2): a 16-byte magic line, the 64 hex digits of the SHA-256 of everything after
them, then the ``torch.save`` bytes of the state. The state is streamed to disk through the
hash, and read back through it, so neither writing nor reading holds a second copy of the
state in memory (v1 serialised it into memory and wrapped those bytes in a second
``torch.save``: twice the state at the peak). Reading recomputes the digest, so a truncated or
bit-flipped file is reported instead of silently resuming from garbage. Writing goes to a
temporary file in the same folder, is fsynced, then renamed over the old checkpoint: a crash
mid-write leaves the previous checkpoint intact. v1 files (``{"format", "sha256", "payload"}``
in a ``torch.save``) are still read.

The state is read with ``torch.load(..., weights_only=True)``: a checkpoint holds tensors and
plain Python values only, never pickled code.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import IO, Any

import torch

from nograd.core.errors import UsageError

FORMAT = "nograd-checkpoint-v1"  # the v1 wrapper's format field
MAGIC = b"nograd-ckpt-v2\n\n"  # 16 bytes
HEADER = len(MAGIC) + 64
_CHUNK = 1 << 22


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes what passes through it on its way to ``f``."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        return self.f.write(view)


class _Window(io.RawIOBase):
    """``f`` from byte ``start`` on, seekable, as torch.load reads it."""

    def __init__(self, f: IO[bytes], start: int) -> None:
        self.f, self.start = f, start
        self.f.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self.f.readinto(buffer)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            return self.f.seek(self.start + offset) - self.start
        return self.f.seek(offset, whence) - self.start

    def tell(self) -> int:
        return self.f.tell() - self.start


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (tensors and plain values) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            f.write(MAGIC + b"0" * 64)
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.seek(len(MAGIC))
            f.write(writer.sha.hexdigest().encode())
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


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a nograd checkpoint (v2; a v1 file is a plain torch.save)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _load_v2(path: Path, f: IO[bytes]) -> dict[str, Any]:
    digest = f.read(64)
    sha = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        sha.update(chunk)
    if sha.hexdigest().encode() != digest:
        raise UsageError(f"checkpoint {str(path)!r} is corrupted or truncated (checksum mismatch)")
    try:
        return torch.load(_Window(f, HEADER), map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {str(path)!r} cannot be read ({_short(e)})") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Every problem with the file (missing, truncated, corrupted, not ours) is a
    :class:`UsageError` with a one-line message.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist")
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) == MAGIC:
                return _load_v2(path, f)
    except OSError as e:
        raise UsageError(f"checkpoint {str(path)!r} cannot be read ({e.strerror or e})") from None
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
