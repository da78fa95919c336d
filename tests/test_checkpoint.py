"""Checkpoints: round trip, atomic writes, and detection of damaged files."""

from __future__ import annotations

import pytest
import torch

from nograd.core.errors import UsageError
from nograd.workbench.checkpoint import load_checkpoint, save_checkpoint


def _state() -> dict:
    g = torch.Generator().manual_seed(5)
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.zeros(3)},
        "rng": {"torch": torch.get_rng_state(), "sampler": g.get_state()},
        "step": 7,
        "forward_tokens": 123.0,
        "config": {"optimizer": "adamw", "lr": None, "opts": {"a": "1"}},
    }


def test_round_trip(tmp_path):
    state = _state()
    path = tmp_path / "sub" / "ck.pt"
    save_checkpoint(path, state)
    got = load_checkpoint(path)
    assert got["step"] == 7 and got["config"] == state["config"]
    assert torch.equal(got["model"]["w"], state["model"]["w"])
    assert torch.equal(got["rng"]["sampler"], state["rng"]["sampler"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck.pt"]  # no temp files left


def test_overwrite_keeps_latest(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 1})
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 2


def test_missing(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_file_is_detected(tmp_path, damage):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, _state())
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
    elif damage == "garbage":
        raw = bytearray(b"not a checkpoint at all")
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="corrupted|truncated|not a nograd|cannot be read") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_every_payload_byte_is_covered(tmp_path):
    # Flip bytes across the whole file: each must be detected, never loaded silently wrong.
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"w": torch.arange(64, dtype=torch.float32)})
    good = path.read_bytes()
    for i in range(0, len(good), max(1, len(good) // 40)):
        raw = bytearray(good)
        raw[i] ^= 0x55
        path.write_bytes(bytes(raw))
        try:
            got = load_checkpoint(path)
        except UsageError:
            continue
        assert torch.equal(got["w"], torch.arange(64, dtype=torch.float32))  # e.g. an unused zip comment byte


def test_not_ours(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"model": torch.zeros(2)}, path)
    with pytest.raises(UsageError, match="not a nograd checkpoint"):
        load_checkpoint(path)


def test_writing_and_reading_stream_without_a_copy_of_the_state(tmp_path):
    # v1 serialised the state into a bytes object first: 40 MB of Python allocations here.
    import tracemalloc

    state = {"w": torch.randn(10_000_000)}  # 40 MB
    tracemalloc.start()
    try:
        save_checkpoint(tmp_path / "ck.pt", state)
        saved_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        got = load_checkpoint(tmp_path / "ck.pt")
        loaded_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert torch.equal(got["w"], state["w"])
    assert saved_peak < 4e6 and loaded_peak < 12e6, (saved_peak, loaded_peak)


def test_a_v1_checkpoint_still_loads(tmp_path):
    import hashlib
    import io

    from nograd.workbench.checkpoint import FORMAT

    buf = io.BytesIO()
    torch.save({"step": 3, "w": torch.ones(2)}, buf)
    payload = buf.getvalue()
    torch.save(
        {"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload},
        tmp_path / "v1.pt",
    )
    got = load_checkpoint(tmp_path / "v1.pt")
    assert got["step"] == 3 and torch.equal(got["w"], torch.ones(2))
