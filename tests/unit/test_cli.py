"""The command line: help lists subcommands; bad input exits non-zero with one clear line."""

import subprocess
import sys

import pytest


def stalwart(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stalwart", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_train():
    out = stalwart("--help")
    assert out.returncode == 0
    assert "train" in out.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--training.lrr", "1"], "unknown key 'training.lrr'"),
        (["--data.source", "files", "--data.path", "/no/such/corpus"], "data.path '/no/such/corpus' does not exist"),
        (["--parallel.tp", "3", "--nproc-per-node", "3"], "tp=3 does not divide n_heads=8; choose tp in {1, 2, 4}"),
        (["--parallel.tp", "2", "--nproc-per-node", "3"], "world size 3 is not divisible by dp_replicate×cp×tp×pp"),
        (["--model.flavor", "13B"], "model.flavor"),
    ],
)
def test_bad_input_one_line_no_traceback(args, expected):
    out = stalwart("train", "--config", "debug", *args)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert expected in lines[0]
    assert "Traceback" not in out.stderr + out.stdout
