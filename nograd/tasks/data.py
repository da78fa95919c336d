"""Tiny Shakespeare: finding the file, the character vocabulary, batches.

Where the text comes from, first match wins:

1. an explicit path (``--data``),
2. the environment variable ``NOGRAD_DATA``,
3. the cache file ``$XDG_CACHE_HOME/nograd/tinyshakespeare.txt``
   (``~/.cache/nograd/tinyshakespeare.txt`` without XDG_CACHE_HOME),
4. a download of the original char-rnn file into that cache, checked against
   its sha256.

The split follows nanoGPT's ``shakespeare_char/prepare.py`` exactly: the
vocabulary is the sorted set of characters, the first 90% of the encoded text
is the training split and the last 10% the validation split.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from nograd.core.errors import UsageError

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FILENAME = "tinyshakespeare.txt"
ENV_VAR = "NOGRAD_DATA"
TRAIN_FRACTION = 0.9

_HINT = f"pass --data PATH or set {ENV_VAR} to a copy of tinyshakespeare.txt"


def cache_path() -> Path:
    """Where a downloaded copy is kept."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nograd" / FILENAME


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_user_file(path: Path, origin: str) -> Path:
    # A user-given file may be any text (a different corpus is fine), so no
    # checksum: only that it exists, is non-empty and decodes as UTF-8.
    if not path.exists():
        raise UsageError(f"data file {str(path)!r} (from {origin}) does not exist; {_HINT}")
    if not path.is_file():
        raise UsageError(f"data path {str(path)!r} (from {origin}) is not a file; {_HINT}")
    if path.stat().st_size == 0:
        raise UsageError(f"data file {str(path)!r} (from {origin}) is empty; {_HINT}")
    return path


def download(
    url: str = URL, dest: Path | None = None, sha256: str | None = SHA256, timeout: float = 30.0
) -> Path:
    """Download ``url`` to ``dest`` atomically and verify its checksum.

    The bytes go to a temporary file in the destination folder that is renamed
    into place only once complete and verified, so an interrupted download never
    leaves a half file where the next run would trust it.
    """
    dest = dest or cache_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 16):
                out.write(chunk)
        got = sha256_file(tmp)
        if sha256 is not None and got != sha256:
            raise UsageError(f"downloaded {url} has sha256 {got}, expected {sha256}; {_HINT}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise UsageError(f"Tiny Shakespeare not found locally and download failed ({e}); {_HINT}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def resolve_path(data: str | os.PathLike | None = None, allow_download: bool = True) -> Path:
    """Find the Tiny Shakespeare file (see the module docstring for the order)."""
    if data:
        return _check_user_file(Path(data).expanduser(), "--data")
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_user_file(Path(env).expanduser(), ENV_VAR)
    cached = cache_path()
    if cached.is_file() and cached.stat().st_size > 0:
        return cached
    if not allow_download:
        raise UsageError(f"Tiny Shakespeare not found at {cached}; {_HINT}")
    return download(URL, cached, SHA256)


def read_text(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file, with a one-line error if it is not text."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"data file {str(path)!r} is not UTF-8 text; {_HINT}") from None
    except OSError as e:
        raise UsageError(f"cannot read data file {str(path)!r}: {e.strerror}") from None
    if not text:
        raise UsageError(f"data file {str(path)!r} is empty; {_HINT}")
    return text


class CharVocab:
    """Character-level vocabulary: the sorted set of characters of a text."""

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> list[int]:
        """Characters to ids; an unknown character is a user error."""
        try:
            return [self.stoi[c] for c in s]
        except KeyError as e:
            raise UsageError(f"character {e.args[0]!r} is not in the model's vocabulary") from None

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)


@dataclass
class CharData:
    """An encoded text split into train and validation token tensors (int64)."""

    vocab: CharVocab
    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_text(cls, text: str, train_fraction: float = TRAIN_FRACTION) -> CharData:
        vocab = CharVocab.from_text(text)
        ids = torch.tensor(vocab.encode(text), dtype=torch.long)
        n = int(len(ids) * train_fraction)  # nanoGPT: int(n * 0.9)
        return cls(vocab, ids[:n], ids[n:])

    @classmethod
    def load(cls, data: str | os.PathLike | None = None) -> CharData:
        return cls.from_text(read_text(resolve_path(data)))


def _gather(data: torch.Tensor, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(block_size)
    return data[idx], data[idx + 1]


class BatchSampler:
    """Random (x, y) windows of a token stream, y being x shifted by one.

    It owns its ``torch.Generator``, so the batches it draws depend only on
    its seed and how many it has drawn: the state goes into checkpoints and a
    resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, data: torch.Tensor, batch_size: int, block_size: int, seed: int = 0) -> None:
        if len(data) <= block_size:
            raise UsageError(f"split of {len(data)} tokens is too short for --block-size {block_size}")
        self.data = data
        self.batch_size = batch_size
        self.block_size = block_size
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: ``x, y`` of shape (batch_size, block_size), int64."""
        starts = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=self.generator)
        return _gather(self.data, starts, self.block_size)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def fixed_batches(
    data: torch.Tensor, batch_size: int, block_size: int, n_batches: int = 50, seed: int = 1234
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed list of batches (same seed, same batches), for comparable evaluations."""
    sampler = BatchSampler(data, batch_size, block_size, seed)
    return [sampler.sample() for _ in range(n_batches)]
