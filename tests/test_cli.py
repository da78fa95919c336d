"""The command line: user errors are one line on stderr with exit status 2, never a traceback."""

from __future__ import annotations

import pytest
from _foundation import run_cli, small_text, tiny_config

from nograd.cli import main, parse_opt
from nograd.core.errors import UsageError
from nograd.workbench import train


def _assert_usage_error(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("nograd: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_bad_gemm_setting_is_one_line(tmp_path):
    r = run_cli("train", "--out", str(tmp_path / "o"), env={"NOGRAD_GEMM": "fastest"})
    _assert_usage_error(r, "NOGRAD_GEMM", "fastest")
    assert not (tmp_path / "o").exists()  # refused before any work


@pytest.fixture(scope="module")
def corrupted_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 this is not a real checkpoint")
    return path


def test_missing_data_file(tmp_path):
    r = run_cli("train", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"))
    _assert_usage_error(r, "missing.txt", "--data", "NOGRAD_DATA")


def test_missing_data_file_from_env(tmp_path):
    r = run_cli("train", "--out", str(tmp_path / "o"), env={"NOGRAD_DATA": str(tmp_path / "gone.txt")})
    _assert_usage_error(r, "NOGRAD_DATA")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--steps", "-5"], "--steps"),
        (["--optimizer", "sgd-magic"], "unknown optimizer 'sgd-magic'"),
        (["--task", "imagenet"], "unknown task 'imagenet'"),
        (["--opt", "novalue"], "KEY=VALUE"),
        (["--steps", "ten"], "invalid int value"),
    ],
)
def test_bad_train_flags(tmp_path, args, needle):
    r = run_cli("train", "--data", str(small_text(tmp_path)), "--out", str(tmp_path / "o"), *args)
    _assert_usage_error(r, needle)


def test_corrupted_checkpoint_sample(corrupted_checkpoint):
    _assert_usage_error(run_cli("sample", "--checkpoint", str(corrupted_checkpoint)), "corrupted")


def test_corrupted_checkpoint_resume(tmp_path, corrupted_checkpoint):
    r = run_cli("train", "--resume", str(corrupted_checkpoint), "--out", str(tmp_path / "o"))
    _assert_usage_error(r, "corrupted")


# The rest run in-process (fast): main() returns the status and prints to the captured streams.


def test_more_user_errors_in_process(tmp_path, capsys):
    data = str(small_text(tmp_path))
    cases = [
        ["train", "--data", data, "--n-embd", "30", "--n-head", "4"],
        ["train", "--data", data, "--opt", "bogus=1", "--steps", "1", "--out", str(tmp_path / "o")],
        ["train", "--data", data, "--no-such-flag"],
        ["train", "--data", data, "--threads", "0"],
        ["sample", "--checkpoint", str(tmp_path / "none.pt")],
        ["frobnicate"],
        [],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if argv:
            assert err.count("\n") == 1 and err.startswith("nograd: error: "), (argv, err)


def test_threads_flag_sets_torch_threads(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # so that the flag has something to change
        train(tiny_config(tmp_path, steps=1, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_parse_opt():
    assert parse_opt("beta2=0.95") == ("beta2", "0.95")
    assert parse_opt("a=b=c") == ("a", "b=c")
    for bad in ("x", "=1", ""):
        with pytest.raises(UsageError):
            parse_opt(bad)


def test_optimizers_lists_methods(capsys):
    assert main(["optimizers"]) == 0
    out = capsys.readouterr().out
    assert "adamw" in out and "muon" in out and "forward-only" in out


def test_sample_from_checkpoint(tmp_path, capsys):
    train(tiny_config(tmp_path, steps=2))
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    capsys.readouterr()
    assert main(["sample", "--checkpoint", ckpt, "--prompt", "ROMEO:", "--chars", "30", "--top-k", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30 + 1
    assert main(["sample", "--checkpoint", ckpt, "--prompt", "\u00e9"]) == 2  # not in the vocabulary
    assert "vocabulary" in capsys.readouterr().err


def test_replay_command_rebuilds_a_mezo_run(tmp_path, capsys):
    """`nograd train --opt trajectory=auto` then `nograd replay`: the final weights, bit for bit."""
    import torch

    from nograd.workbench.checkpoint import load_checkpoint

    cfg = tiny_config(tmp_path, optimizer="mezo", lr=1e-3, opts={"trajectory": "auto"})
    train(cfg)
    log = tmp_path / "run" / "trajectory.jsonl"
    out = tmp_path / "replayed.pt"
    assert main(["replay", "--checkpoint", f"{log}.init.pt", "--log", str(log), "--out", str(out)]) == 0
    assert "replayed 6 of 6 steps" in capsys.readouterr().out
    final = torch.load(out, weights_only=True)
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    for name, tensor in trained.items():
        assert torch.equal(final[name], tensor), name


def test_replay_command_bad_log(tmp_path):
    log = tmp_path / "t.jsonl"
    log.write_text("not json\n")
    r = run_cli(
        "replay",
        "--checkpoint",
        str(tmp_path / "none.pt"),
        "--log",
        str(log),
        "--out",
        str(tmp_path / "o.pt"),
    )
    _assert_usage_error(r)


def _documented_train_commands() -> list[list[str]]:
    """Every `nograd train ...` of README.md's code blocks and of the Makefile, as argv lists."""
    import re
    import shlex

    from _foundation import REPO

    text = (REPO / "README.md").read_text() + "\n" + (REPO / "Makefile").read_text()
    text = re.sub(r"\\\n\s*", " ", text)  # join continued lines
    make_values = {
        "$(VENV)/bin/": "",
        "$(DEMO_MINUTES)": "3",
        "$(DEMO_OUT)": "runs/demo",
        "$(DEMO_DECAY_STEPS)": "2520",
        "$(DEMO_SAMPLE_EVERY)": "5000",
        "$(DEMO_COMPILE)": "--compile",
    }
    for name, value in make_values.items():
        text = text.replace(name, value)
    text = re.sub(r"\$\(if \$\(DATA\),--data \$\(DATA\)\)", "", text)
    commands = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("nograd train "):
            commands.append(shlex.split(line)[1:])
    return commands


def test_documented_train_commands_still_parse():
    from nograd.cli import build_parser, config_from_args

    commands = _documented_train_commands()
    assert len(commands) >= 4  # README's baby GPT and resume; the Makefile's demo and demo-adamw
    for argv in commands:
        args = build_parser(argv).parse_args(argv)
        cfg, explicit = config_from_args(args)
        flags = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")} - {"resume"}
        assert flags <= explicit | {"opt"}, argv  # every flag reached the config
        if "--resume" not in argv:
            cfg.validate()
