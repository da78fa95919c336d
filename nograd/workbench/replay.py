"""``nograd replay``: a ZO run's final weights rebuilt from a checkpoint file and a trajectory log.

The replay itself is :func:`nograd.zo.replay`; this module reads and writes the files around it
(a nograd checkpoint or a plain ``torch.save`` of a state dict).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nograd.core.errors import UsageError
from nograd.workbench.checkpoint import FORMAT, is_checkpoint, load_checkpoint, save_checkpoint
from nograd.zo.replay import read_trajectory, replay


def _load_any(path: str | os.PathLike) -> tuple[dict[str, Any], bool]:
    """(container, is_nograd_checkpoint) for a nograd checkpoint or a plain ``torch.save`` file."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"checkpoint {str(p)!r} does not exist")
    if is_checkpoint(p):
        return load_checkpoint(p), True
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {str(p)!r} cannot be read ({type(e).__name__})") from None
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        return load_checkpoint(p), True
    if not isinstance(raw, dict):
        raise UsageError(f"checkpoint {str(p)!r} does not hold a dict of tensors")
    return raw, False


def _state_dict_of(container: dict[str, Any]) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_state_dict"):
        inner = container.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    if container and all(isinstance(v, torch.Tensor) for v in container.values()):
        return container
    raise UsageError("the checkpoint holds no model state dict (a dict of tensors, or one under 'model')")


def replay_command(
    checkpoint: str | os.PathLike, log: str | os.PathLike, out: str | os.PathLike
) -> dict[str, Any]:
    """``nograd replay --checkpoint INIT.pt --log trajectory.jsonl --out FINAL.pt``.

    Reads the initial weights (a nograd checkpoint, whose ``"model"`` entry is used, or a plain
    ``torch.save``'d state dict / dict with a ``"model"`` state dict), replays the log's steps
    onto the tensors named in its header, and writes ``out`` in the same container format with
    only those tensors changed (a nograd checkpoint gets ``"replayed_steps"`` added; its other
    entries, such as optimizer state, are copied unchanged, so ``out`` is for evaluation and
    sampling, not for resuming). Tied tensors that share storage in the file stay tied.
    Returns a summary ``{"steps", "tensors", "parameters", "optimizer", "out"}``. Every user
    error (missing file, log without names, mismatched shapes) is a UsageError.
    """
    header, records = read_trajectory(log)
    if header is None:
        raise UsageError(f"trajectory log {str(log)!r} has no header line")
    names = header.get("names")
    if not names:
        raise UsageError(
            "the log does not name its tensors (the optimizer was built from bare tensors); "
            "replay it from Python with nograd.zo.replay(model, log)"
        )
    container, is_nograd = _load_any(checkpoint)
    state = _state_dict_of(container)
    missing = [n for n in names if n not in state]
    if missing:
        raise UsageError(f"the checkpoint has no tensor {missing[0]!r} that the log trained")
    tensors = [state[n] for n in names]
    bad = [n for n, t in zip(names, tensors) if not t.is_floating_point()]
    if bad:
        raise UsageError(f"tensor {bad[0]!r} is not floating point")
    for t in tensors:
        t.requires_grad_(True)
    try:
        opt = replay(tensors, log if not isinstance(log, (str, os.PathLike)) else [header, *records])
    except ValueError as e:
        raise UsageError(f"cannot replay {str(log)!r}: {e}") from None
    finally:
        for t in tensors:
            t.requires_grad_(False)
    applied = sum(1 for r in records if not r.get("skipped"))
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if is_nograd:
        container["replayed_steps"] = len(records)
        save_checkpoint(out_path, container)
    else:
        torch.save(container, out_path)
    return {
        "steps": len(records),
        "applied": applied,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors),
        "optimizer": header["optimizer"],
        "final_step": opt.step_count,
        "out": str(out_path),
    }
