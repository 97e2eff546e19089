"""bench/gpu_suite.py's CPU path: the one prepared GPU run must keep working where CI has no GPU.

The suite runs as a real process (with its own ``stalwart healthd``); the test checks the JSON it
writes against itself (tokens/s from the step times, the speed-up from both rates) and against the
model (the checkpointed state holds the parameters and both AdamW moments).
"""

import json
import statistics
import subprocess
import sys
from pathlib import Path

from stalwart.model.args import get_flavor
from stalwart.model.flops import count_params

SUITE = Path(__file__).resolve().parents[2] / "bench" / "gpu_suite.py"


def run_suite(out: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SUITE), "--out", str(out), "--device", "cpu", *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_suite.json").read_text())


def check_rate(entry: dict) -> None:
    steps = entry["step_seconds"]
    assert steps["n"] >= 2 and 0 < steps["min"] <= steps["median"] <= steps["max"]
    assert entry["tokens_per_s"] == entry["tokens_per_step"] / steps["median"]
    assert entry["mfu"] is None  # no peak FLOP/s on CPU
    assert entry["loss_last"] > 0


def test_cpu_path_measures_every_phase(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # bf16 autocast as on the GPU: the trainer's chunked loss and transformers' autocast both run.
    checkpoints = work / "checkpoints"
    results = run_suite(out, "--work-dir", str(work), "--checkpoint-dir", str(checkpoints), "--dtype", "bfloat16")
    phases = results["phases"]
    failed = {name: e.get("traceback") or e.get("reason") for name, e in phases.items() if e["status"] != "ok"}
    assert not failed, failed
    assert list(phases) == ["nvml", "mfu", "checkpoint", "health"]

    suite = results["suite"]
    assert suite["device"] == "cpu" and suite["shape"]["flavor"] == "debug" and suite["elapsed_s"] > 0

    mfu = phases["mfu"]
    ours, theirs = mfu["stalwart"], mfu["transformers"]
    check_rate(ours)
    check_rate(theirs)
    assert ours["tokens_per_step"] == theirs["tokens_per_step"] == 2 * 64
    assert mfu["speedup"] == ours["tokens_per_s"] / theirs["tokens_per_s"]
    assert theirs["attn_implementation"] == "sdpa"
    assert ours["compute_dtype"] == theirs["compute_dtype"] == "torch.bfloat16"
    assert ours["master_weights"] == theirs["master_weights"] == "torch.float32"
    args = get_flavor("debug")
    params = count_params(type(args)(**{**args.__dict__, "n_layers": 2}))
    assert ours["model"]["params"] == params

    ckpt = phases["checkpoint"]
    # fp32 parameters and two fp32 AdamW moments: the whole state, not the model alone.
    assert ckpt["state_bytes"] >= 3 * 4 * params
    assert ckpt["pinned_d2h_seconds"] is None  # a CPU state has no device-to-host copy
    assert 0 < ckpt["blocking_seconds"] < ckpt["write_seconds"]
    assert ckpt["steps_quiet"]["n"] >= 2
    assert ckpt["storage"].endswith(str(checkpoints))
    committed = list(checkpoints.glob("step-*"))
    assert committed, "the checkpoint phase committed no step"

    health = phases["health"]
    assert health["heartbeats"] is True and health["healthd"]
    tokens = ours["tokens_per_step"]
    assert health["tokens_per_s_on"] == tokens / health["step_seconds"]["median"]
    assert health["tokens_per_s_off"] == tokens / health["step_seconds_off"]["median"]  # the off trainer, interleaved
    assert health["on_over_off"] == health["tokens_per_s_on"] / health["tokens_per_s_off"]
    assert health["step_seconds"]["n"] >= 2 * health["golden_every"] and health["golden_checks_in_timed_steps"] >= 2

    nvml = phases["nvml"]
    assert nvml["present"] is bool(nvml.get("raw"))
    assert nvml["present"] or nvml["reason"]

    summary = (out / "summary.txt").read_text()
    for name in phases:
        assert f"\n{name}" in summary
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite.json", "summary.txt"]  # nothing large comes back
    assert statistics.median([ours["tokens_per_s"], theirs["tokens_per_s"]]) > 0


def test_budget_spent_skips_phases_and_says_why(tmp_path):
    results = run_suite(tmp_path / "out", "--budget-s", "0")
    phases = results["phases"]
    assert list(phases) == ["nvml", "mfu", "checkpoint", "health"]
    for name in ("nvml", "mfu"):
        entry = phases[name]
        assert entry["status"] == "skipped" and "budget" in entry["reason"] and "--budget-s" in entry["reason"]
    for name in ("checkpoint", "health"):  # they step the mfu phase's trainer
        assert phases[name]["status"] == "skipped" and "mfu phase did not complete" in phases[name]["reason"]
    assert "skipped: budget" in (tmp_path / "out" / "summary.txt").read_text()
