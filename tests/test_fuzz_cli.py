"""`nograd train` under random flags: every run ends in status 0 or one line and status 2.

Each flag gets either a small valid value or one from the classes of bad input (negative, zero,
NaN, infinity, more than float32 or int64 holds, not a number, an unknown name). Runs are tiny
and stop after a few milliseconds of training, so a valid combination finishes quickly.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from _foundation import small_text  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nograd.cli import main  # noqa: E402
from nograd.workbench.registry import load_methods  # noqa: E402

BAD_NUMBERS = ["-1", "0", "nan", "inf", "-inf", "1e308", "1e39", str(2**70), "ten", "", "1e-320"]
SMALL = {
    "steps": ["0", "1", "3"],
    "eval-every": ["1", "2"],
    "seed": ["0", "7"],
    "lr": ["1e-3", "0.5"],
    "warmup": ["0", "2"],
    "lr-decay-steps": ["1", "5"],
    "min-lr-ratio": ["0", "1", "0.5"],
    "weight-decay": ["0", "0.1"],
    "population": ["2", "4", "5"],
    "sigma": ["0.01", "1"],
    "rank": ["1", "2"],
    "eps": ["1e-3"],
    "directions": ["1", "3"],
    "n-layer": ["1", "2"],
    "n-head": ["1", "2", "3"],
    "n-embd": ["8", "12"],
    "block-size": ["4", "8"],
    "batch-size": ["1", "3"],
    "dropout": ["0", "0.5"],
    "eval-batches": ["1", "2"],
    "sample-chars": ["0", "5"],
    "threads": ["1"],
    "budget-minutes": ["1e-4"],
    "sample-every": ["0", "1"],
}
CHOICES = {
    "optimizer": sorted(load_methods()) + ["nope", ""],
    "outer": ["adamw", "sgd", "muon", "lion"],
    "attention": ["sdpa", "math", "flash"],
    "device": ["cpu", "nope", "cuda:9"],
    "opt": [
        "beta2=0.95",
        "mode=loop",
        "bogus=1",
        "novalue",
        "=3",
        "reuse=0",
        "noise=gaussian-table",
        "shaping=raw",
        "mode=batched",
        "orthogonal=true",
        "guided=0.5",
        "guide_history=0",
        "sigma_lr=0.1",
    ],
}


def _value(flag: str) -> st.SearchStrategy[str]:
    if flag in CHOICES:
        return st.sampled_from(CHOICES[flag])
    return st.one_of(st.sampled_from(SMALL[flag]), st.sampled_from(BAD_NUMBERS))


FLAGS = sorted(SMALL) + sorted(CHOICES)
flag_sets = st.lists(st.sampled_from(FLAGS), min_size=1, max_size=6, unique=True).flatmap(
    lambda flags: st.tuples(*[st.tuples(st.just(f), _value(f)) for f in flags])
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(small_text(tmp_path_factory.mktemp("fuzz")))


@pytest.fixture(autouse=True, scope="module")
def keep_threads():
    """--threads sets torch's process-wide thread count: put it back for the tests that follow."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flags=flag_sets)
def test_train_never_ends_in_a_traceback(flags, data, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("run")
    argv = [
        "train",
        "--data",
        data,
        "--out",
        str(out),
        "--quiet",
        "--n-embd",
        "8",
        "--n-head",
        "2",
        "--n-layer",
        "1",
        "--block-size",
        "8",
        "--batch-size",
        "2",
        "--eval-batches",
        "1",
        "--sample-chars",
        "3",
        "--steps",
        "2",
        "--budget-minutes",
        "1e-4",
    ]
    for flag, value in flags:
        argv.append(f"--{flag}={value}")
    capsys.readouterr()  # nothing left over from an earlier example
    status = main(argv)  # any exception other than a clean exit fails the test with its traceback
    err = capsys.readouterr().err
    assert status in (0, 2), (argv, status, err)
    if status == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("nograd: error: "), (argv, err)
