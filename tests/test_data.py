"""Tiny Shakespeare loading, the nanoGPT split, batch sampling, and data-path errors."""

from __future__ import annotations

import hashlib

import pytest
import torch
from _foundation import shakespeare_path

from nograd.core.errors import UsageError
from nograd.tasks import data
from nograd.tasks.data import BatchSampler, CharData, CharVocab, fixed_batches


def test_nanogpt_split_and_vocabulary():
    d = CharData.load(shakespeare_path())
    assert len(d.vocab) == 65
    assert d.vocab.chars == "".join(sorted(d.vocab.chars))
    assert d.vocab.chars[:2] == "\n " and d.vocab.chars[-1] == "z"
    assert len(d.train) == 1_003_854
    assert len(d.val) == 111_540
    assert d.train.dtype == torch.int64
    assert d.vocab.decode(d.train[:14]) == "First Citizen:"


def test_vocab_round_trip_and_unknown_char():
    v = CharVocab.from_text("hello world")
    assert v.decode(v.encode("low")) == "low"
    with pytest.raises(UsageError, match="not in the model's vocabulary"):
        v.encode("Z")


def test_sampler_shapes_and_shift():
    ids = torch.arange(1000)
    s = BatchSampler(ids, batch_size=5, block_size=8, seed=0)
    x, y = s.sample()
    assert x.shape == y.shape == (5, 8)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one position


def test_sampler_state_round_trip():
    ids = torch.arange(1000)
    a = BatchSampler(ids, 4, 8, seed=3)
    a.sample()
    state = a.state_dict()
    expected = a.sample()
    b = BatchSampler(ids, 4, 8, seed=99)
    b.load_state_dict(state)
    got = b.sample()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_sampler_ignores_global_rng():
    ids = torch.arange(1000)
    a, b = BatchSampler(ids, 4, 8, seed=1), BatchSampler(ids, 4, 8, seed=1)
    torch.manual_seed(0)
    xa, _ = a.sample()
    torch.rand(100)
    xb, _ = b.sample()
    assert torch.equal(xa, xb)


def test_fixed_batches_are_fixed():
    ids = torch.arange(500)
    a, b = fixed_batches(ids, 3, 8, n_batches=4, seed=7), fixed_batches(ids, 3, 8, n_batches=4, seed=7)
    assert len(a) == 4
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b, strict=True))


def test_user_path_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("NOGRAD_DATA", raising=False)
    with pytest.raises(UsageError, match="does not exist.*--data"):
        data.resolve_path(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UsageError, match="is empty"):
        data.resolve_path(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(UsageError, match="not UTF-8"):
        data.read_text(binary)
    monkeypatch.setenv("NOGRAD_DATA", str(tmp_path / "missing.txt"))
    with pytest.raises(UsageError, match="NOGRAD_DATA"):
        data.resolve_path(None)


def test_env_var_and_cache(tmp_path, monkeypatch):
    good = tmp_path / "t.txt"
    good.write_text("abc")
    monkeypatch.setenv("NOGRAD_DATA", str(good))
    assert data.resolve_path(None) == good
    monkeypatch.delenv("NOGRAD_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "nograd" / "tinyshakespeare.txt"
    assert data.cache_path() == cached
    cached.parent.mkdir(parents=True)
    cached.write_text("abc")
    assert data.resolve_path(None) == cached


def test_download_verifies_checksum(tmp_path, monkeypatch):
    src = tmp_path / "src.txt"
    src.write_text("some text\n")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "t.txt"
    assert data.download(src.as_uri(), dest, digest) == dest
    assert dest.read_text() == "some text\n"
    bad = tmp_path / "cache" / "bad.txt"
    with pytest.raises(UsageError, match="sha256"):
        data.download(src.as_uri(), bad, "0" * 64)
    assert not bad.exists()
    assert [p.name for p in bad.parent.iterdir()] == ["t.txt"]  # no partial files left


def test_offline_without_file_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("NOGRAD_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "URL", (tmp_path / "no-such-file").as_uri())  # stands in for "offline"
    with pytest.raises(UsageError) as e:
        data.resolve_path(None)
    msg = str(e.value)
    assert "--data" in msg and "NOGRAD_DATA" in msg and "\n" not in msg
