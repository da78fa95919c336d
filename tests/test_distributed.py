"""Several processes (gloo, 2 on this machine): the same weights as one process, bit for bit;
checkpoints that resume with another process count; a dead or hung rank stops the others."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _foundation import REPO, tiny_config

from nograd.core.distributed import Collective, shares
from nograd.core.errors import RunAborted
from nograd.workbench import train
from nograd.workbench.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")

TIMEOUT_S = 10  # --dist-timeout of the fault tests


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as each torchrun process has: then one process's arithmetic is the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None)
    return env


def _flags(cfg) -> list[str]:
    """The CLI flags of a tiny_config (the same run from the command line)."""
    t = cfg.task_config
    flags = {
        "data": t.data,
        "n-layer": t.n_layer,
        "n-head": t.n_head,
        "n-embd": t.n_embd,
        "block-size": t.block_size,
        "batch-size": t.batch_size,
        "eval-batches": t.eval_batches,
        "sample-chars": t.sample_chars,
        "steps": cfg.steps,
        "eval-every": cfg.eval_every,
        "warmup": cfg.warmup,
        "optimizer": cfg.optimizer,
        "out": cfg.out,
        "threads": 1,
        "dist-check-every": 1,
    }
    for name in ("population", "directions", "lr_decay_steps"):
        if getattr(cfg, name) is not None:
            flags[name.replace("_", "-")] = getattr(cfg, name)
    return [f"--{k}={v}" for k, v in flags.items()] + ["--quiet"]


def torchrun(cfg, nproc: int = 2, extra: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "nograd",
        "train",
        *_flags(cfg),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=180)


def _same_weights(a_path, b_path) -> None:
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert a["step"] == b["step"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


@pytest.mark.parametrize(
    "optimizer, extra",
    [
        ("eggroll", {"population": 8}),
        ("openai-es", {"population": 8}),
        ("snes", {"population": 8}),
        ("mezo", {"directions": 4}),
        ("nres", {"population": 8}),
    ],
)
def test_two_processes_equal_one_bit_for_bit(tmp_path, optimizer, extra):
    one = tiny_config(tmp_path, optimizer=optimizer, out=str(tmp_path / "one"), **extra)
    train(one)
    r = torchrun(replace(one, out=str(tmp_path / "two")))
    assert r.returncode == 0, r.stderr[-2000:]
    _same_weights(tmp_path / "one" / "checkpoint.pt", tmp_path / "two" / "checkpoint.pt")
    rows = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert '"dist_bytes"' in rows[-1]  # the bytes each rank sent per step
    assert (tmp_path / "two" / "loss.png").is_file()


def test_data_parallel_gradient_baseline_matches_to_rounding(tmp_path):
    one = tiny_config(tmp_path, optimizer="adamw", out=str(tmp_path / "one"))
    train(one)
    r = torchrun(replace(one, out=str(tmp_path / "two")))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (
        load_checkpoint(tmp_path / "one" / "checkpoint.pt"),
        load_checkpoint(tmp_path / "two" / "checkpoint.pt"),
    )
    for name, tensor in a["model"].items():  # each rank's half of the batch, gradients all-reduced
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-5)


def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path):
    whole = tiny_config(tmp_path, optimizer="eggroll", population=8, out=str(tmp_path / "whole"))
    train(whole)
    half = replace(whole, out=str(tmp_path / "split"), steps=3, lr_decay_steps=6)
    r = torchrun(half)
    assert r.returncode == 0, r.stderr[-2000:]
    train(replace(whole, out=str(tmp_path / "split"), resume="auto"))
    _same_weights(tmp_path / "whole" / "checkpoint.pt", tmp_path / "split" / "checkpoint.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(tmp_path, signal_to_rank1: int) -> tuple[subprocess.CompletedProcess, float]:
    cfg = tiny_config(tmp_path, optimizer="eggroll", population=8, steps=10**6, eval_every=50)
    port, procs = _free_port(), []
    for rank in (0, 1):
        env = {
            **_env(),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
        cmd = [sys.executable, "-m", "nograd", "train", *_flags(cfg), f"--dist-timeout={TIMEOUT_S}"]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "run" / "checkpoint.pt").exists():  # training is under way
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.1)
        os.kill(procs[1].pid, signal_to_rank1)
        t0 = time.monotonic()
        out, err = procs[0].communicate(timeout=TIMEOUT_S + 30)
        return subprocess.CompletedProcess(
            procs[0].args, procs[0].returncode, out, err
        ), time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_dead_or_hung_rank_stops_the_other_within_the_timeout(tmp_path, sig):
    r, seconds = _start_ranks(tmp_path, sig)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith("nograd: error: rank 0 of 2 lost contact with the other processes")
    assert "--resume" in lines[0]
    assert seconds < TIMEOUT_S + 10
    # and the run resumes from its last checkpoint, in one process
    ckpt = tmp_path / "run" / "checkpoint.pt"
    step = load_checkpoint(ckpt)["step"]
    cfg = tiny_config(tmp_path, optimizer="eggroll", population=8, steps=step + 2, resume=str(ckpt))
    assert train(cfg)["steps"] == step + 2


# ------------------------------------------------------------------ the collective itself


def test_shares_partition_in_whole_units():
    for n, world, unit in [(8, 2, 2), (10, 3, 2), (7, 4, 1), (4, 8, 2), (256, 16, 2)]:
        blocks = shares(n, world, unit)
        assert [i for b in blocks for i in b] == list(range(n))
        assert all(len(b) % unit == 0 for b in blocks)
        assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= unit
    with pytest.raises(ValueError, match="whole units"):
        shares(7, 2, unit=2)


def _worker(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    c = Collective(dist.group.WORLD)
    try:
        mine = torch.arange(10, dtype=torch.float64)[c.share(10, unit=2)] * 10
        whole = c.gather(mine.view(-1, 1), 10, unit=2).flatten().tolist()
        c.check_same([torch.ones(3)])
        try:
            c.check_same([torch.full((3,), float(rank))])
            diverged = None
        except RunAborted as e:
            diverged = str(e)
        queue.put((rank, whole, c.bytes_sent, diverged))
    finally:
        dist.destroy_process_group()


def test_gather_and_weight_check_between_two_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for _rank, whole, sent, diverged in results:
        assert whole == [10.0 * i for i in range(10)]
        assert sent > 0
        assert diverged is not None and "differ" in diverged and "[1]" in diverged


def test_one_process_collective_is_a_no_op():
    c = Collective(None)
    t = torch.arange(6.0).view(3, 2)
    assert c.gather(t, 3) is t and c.max(2.5) == 2.5 and c.bytes_sent == 0
    c.check_same([t])  # nothing to compare with
