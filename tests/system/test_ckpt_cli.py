"""`stalwart ckpt ls|verify|inspect|export` on a real 2-rank FSDP checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from dist_harness import run_ranks

from stalwart.cli.main import main
from stalwart.model.args import get_flavor
from stalwart.model.hf import hf_config_from_args, load_hf_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A run directory with steps 1 and 2 of a 2-rank FSDP job, and the full weights of step 2."""
    run_dir = tmp_path_factory.mktemp("ckpt-cli") / "run"
    saved = run_ranks(
        "tests/ckpt_cases.py:save_fsdp",
        world_size=2,
        timeout=180,
        url=str(run_dir / "checkpoints"),
        model_config=hf_config_from_args(get_flavor("debug")),
    )[0]
    return run_dir, saved


def ckpt(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["ckpt", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ls_inspect_and_verify(run, capsys) -> None:
    run_dir, _ = run
    code, out, _ = ckpt(capsys, "ls", run_dir)
    rows = out.splitlines()[1:]
    assert code == 0 and [r.split()[0] for r in rows] == ["1", "2"]
    assert all(r.split()[1] == "no" and "dp_shard=2" in r and "MiB" in r for r in rows)

    code, out, _ = ckpt(capsys, "inspect", run_dir / "checkpoints", 2)
    assert code == 0 and "world size 2, layout dp_shard=2" in out and "hidden_size=128" in out
    line = next(x for x in out.splitlines() if "model.tok_embeddings.weight" in x)
    assert line.split()[1:] == ["[264,", "128]", "float32", "2", "shards"]

    code, out, err = ckpt(capsys, "verify", run_dir)
    assert code == 0 and out.count(": ok (") == 2 and not err
    shard = sorted((run_dir / "checkpoints" / "step-00000002").glob("*.distcp"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    try:
        code, out, err = ckpt(capsys, "verify", run_dir)
        assert code == 1 and "step 1: ok" in out
        bad = [x for x in err.splitlines() if x.startswith("step 2:")]
        assert (
            bad == [f"step 2: file {shard.name} fails its crc32 check" + bad[0].split("check", 1)[1]] and len(bad) == 1
        )
        code, _, err = ckpt(capsys, "export", run_dir, 2, "--out", run_dir.parent / "bad.pt")
        assert code == 1 and "step 2 is damaged" in err and not (run_dir.parent / "bad.pt").exists()
    finally:
        data[len(data) // 3] ^= 0x10
        shard.write_bytes(bytes(data))


def test_export_torch_and_hf(run, capsys, tmp_path: Path) -> None:
    run_dir, saved = run
    code, _, _ = ckpt(capsys, "export", run_dir, 2, "--format", "torch", "--out", tmp_path / "step2.pt")
    assert code == 0
    state = torch.load(tmp_path / "step2.pt", weights_only=False)
    assert state["step"] == 2 and state["model"].keys() == saved["model"].keys()
    for name, tensor in saved["model"].items():  # full, unsharded tensors
        torch.testing.assert_close(state["model"][name], tensor, rtol=0, atol=0, msg=name)
    assert set(state["optim"]["state"]) == set(saved["exp_avg"])

    code, _, _ = ckpt(capsys, "export", run_dir, 2, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0
    args, loaded = load_hf_checkpoint(tmp_path / "hf")
    assert args.dim == 128 and loaded.keys() == saved["model"].keys()
    for name, tensor in saved["model"].items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["ls", "/no/such/run"], "/no/such/run does not exist"),
        (["inspect", "{run}", "7"], "step 7 is not committed"),
        (["export", "{run}", "1", "--out", "{run}"], "already exists; give --out a new path"),
    ],
)
def test_bad_input_is_one_line_exit_2(run, capsys, args, expected) -> None:
    run_dir, _ = run
    code, _, err = ckpt(capsys, *(a.format(run=run_dir) for a in args))
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err


def test_empty_directory_has_no_checkpoints(capsys, tmp_path: Path) -> None:
    code, _, err = ckpt(capsys, "ls", tmp_path)
    assert code == 2 and "no committed checkpoints under" in err
    shutil.rmtree(tmp_path)
