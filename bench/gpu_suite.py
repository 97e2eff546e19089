"""Every GPU figure of issue 17 in one run: MFU against Hugging Face, checkpoint blocking, health overhead, NVML.

    python bench/gpu_suite.py --out DIR [--device auto|cpu|cuda] [--budget-s 240] [--work-dir DIR]
        [--checkpoint-dir auto|DIR] [--compile auto|on|off] [--dtype auto|float32|bfloat16] [--steps N]

Writes ``DIR/gpu_suite.json`` (every figure, rewritten after each phase, so a run cut short keeps what it
measured) and ``DIR/summary.txt`` (the same, a line per figure, the goal beside it). Large files
(checkpoints, event logs) go under ``--work-dir`` and ``--checkpoint-dir`` (temporary folders by
default, removed at the end), never under ``DIR``. bench/RESULTS.md ("pending: GPU") has the exact
device command and what it carries.

Phases, in order (each one is skipped, with the reason recorded, when the budget left is too small,
and a phase that fails records its error and the next one runs):

1. ``nvml``: what ``health.probes.GpuProbe`` and the NVML queries it makes read on this machine
   (temperature, power, clocks, ECC counters, row remaps, retired pages, XID event subscription), and
   that a GPU missing from NVML's count is reported as a fatal ``lost`` issue (the dead-GPU path).
2. ``mfu``: the trainer (``runtime.train.Trainer``, stepped through the loop's own ``_one_step``) on the
   1B flavor at 4 x 4096 on CUDA (per-block compile, bf16 autocast over fp32 master weights, fused
   AdamW, the chunked fp32 loss, one host sync per step), health checks off; and in the same process
   ``transformers``' ``LlamaForCausalLM`` of the same shape (SDPA, ``torch.compile`` of the whole
   model, fused AdamW, bf16 autocast, its loss read back every step as the trainer reads its
   scalars), timed in alternating rounds. tokens/s, MFU (6N + 12·L·H·Dh·S FLOPs per token,
   ``model.flops``, against the device's dense bf16 peak), peak memory. A world of one rank creates
   no process group, so the one-GPU trainer runs unsharded (FSDP on one rank would add only a copy).
3. ``checkpoint``: the same trainer's state: pinned device-to-host copy time of all its tensors, the
   async save's blocking time (the second save: the first allocates the pinned staging cache), and
   steps/s during the background write against the steps just before it.
4. ``health``: a second trainer with a real ``stalwart healthd`` process (heartbeats, its GPU probes),
   the golden workload and parameter fingerprints every ``--health-every`` steps (fingerprints need
   a data-parallel replica: off on one GPU, and the JSON says so), stepped in alternating rounds with
   phase 2's trainer (health checks off, still in memory); tokens/s on over off.

On CPU the same phases run a tiny shape (the debug flavor, 2 layers, 2 x 64, eager, fp32 unless
``--dtype``/``--compile`` say otherwise) in seconds; the CI smoke test (tests/system/test_gpu_suite.py)
keeps that path working. Its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from traceback import format_exc
from typing import Any

import torch

from stalwart.files import atomic_write, atomic_write_json
from stalwart.jobenv import TOKEN_FILE_ENV
from stalwart.model.args import ModelArgs, get_flavor
from stalwart.model.flops import count_params, flops_per_token, mfu
from stalwart.model.hf import hf_config_from_args
from stalwart.runtime.config import load_config
from stalwart.runtime.metrics import peak_flops
from stalwart.runtime.train import PreemptionFlag, Trainer

RESULTS_FILE = "gpu_suite.json"
SUMMARY_FILE = "summary.txt"


@dataclass(frozen=True)
class Shape:
    """The model and batch of every phase."""

    flavor: str
    n_layers: int  # 0 keeps the flavor's depth
    batch: int
    seq_len: int
    compile: bool
    dtype: str  # the trainer's training.dtype
    warmup_steps: int  # untimed steps (compilation, allocator warm-up)
    steps: int  # timed steps per measurement


CUDA_SHAPE = Shape("1B", 0, 4, 4096, compile=True, dtype="bfloat16", warmup_steps=4, steps=20)
CPU_SHAPE = Shape("debug", 2, 2, 64, compile=False, dtype="float32", warmup_steps=2, steps=4)


class Budget:
    """The run's global time budget: phases ask before they start and timed loops stop early."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Suite:
    """The results document, written to disk after every phase."""

    def __init__(self, out: Path, device: torch.device, shape: Shape, budget: Budget) -> None:
        self.out, self.device, self.shape, self.budget = out, device, shape, budget
        self.results: dict[str, Any] = {"suite": machine(device, shape, budget), "phases": {}}

    def run_phase(self, name: str, needs_s: float, phase: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run ``phase`` if ``needs_s`` seconds of budget are left; record its figures, skip or error."""
        left = self.budget.left()
        if left < needs_s:
            entry: dict[str, Any] = {
                "status": "skipped",
                "reason": f"budget: {left:.0f} s left, the phase needs ~{needs_s:.0f} s (raise --budget-s)",
            }
        else:
            t0 = time.monotonic()
            try:
                entry = {"status": "ok", **phase()}
            except Exception as e:  # one phase's failure must not lose the others' figures (nor its own so far)
                so_far = {k: v for k, v in self.results["phases"].get(name, {}).items() if k != "status"}
                entry = {**so_far, "status": "error", "error": f"{type(e).__name__}: {e}", "traceback": format_exc()}
            entry["seconds"] = round(time.monotonic() - t0, 2)
        self.results["phases"][name] = entry
        self.write()
        print(f"[{self.budget.elapsed():6.1f} s] {name}: {entry['status']}", flush=True)
        return entry if entry["status"] == "ok" else None

    def skip(self, name: str, reason: str) -> None:
        self.results["phases"][name] = {"status": "skipped", "reason": reason}
        self.write()
        print(f"[{self.budget.elapsed():6.1f} s] {name}: skipped", flush=True)

    def partial(self, name: str, figures: dict[str, Any]) -> None:
        """What a phase measured so far, on disk before its next part runs (replaced when it ends)."""
        self.results["phases"][name] = {"status": "partial", **figures}
        self.write()

    def write(self) -> None:
        self.results["suite"]["elapsed_s"] = round(self.budget.elapsed(), 2)
        atomic_write_json(self.out / RESULTS_FILE, self.results, durable=False)
        atomic_write(self.out / SUMMARY_FILE, summary(self.results), durable=False)


# ------------------------------------------------------------------------------------- helpers


def machine(device: torch.device, shape: Shape, budget: Budget) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "host": platform.node(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "commit": git_commit(),
        "budget_s": budget.seconds,
        "shape": shape.__dict__,
    }
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["transformers"] = importlib.metadata.version("transformers")  # without importing it (seconds)
    return info


def git_commit() -> str:
    """The checkout's commit; $STALWART_COMMIT where the tree was copied without its .git (the device machine)."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    return os.environ.get("STALWART_COMMIT", "unknown (no git checkout; set STALWART_COMMIT)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max of per-step seconds (the machine's noise shows in min..max)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def throughput(step_seconds: list[float], tokens_per_step: int, args: ModelArgs, seq_len: int, peak: float | None):
    """tokens/s and MFU from the median step time."""
    median = statistics.median(step_seconds)
    tps = tokens_per_step / median
    return {
        "step_seconds": spread(step_seconds),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tps,
        "mfu": mfu(tps, args, seq_len, peak) if peak else None,
    }


def sdpa_backends(device: torch.device, args: ModelArgs, shape: Shape) -> dict[str, Any]:
    """Whether flash / cuDNN attention accept the model's attention shapes in bf16 (else SDPA falls back)."""
    if device.type != "cuda":
        return {"checked": False, "reason": "CPU: SDPA's math/flash-CPU kernels"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(shape.batch, args.n_heads, shape.seq_len, args.head_dim, device=device, dtype=torch.bfloat16)
    found: dict[str, Any] = {"checked": True}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            sync(device)
            found[name] = True
        except RuntimeError as e:
            found[name] = f"unavailable: {str(e).splitlines()[0]}"
    return found


# ------------------------------------------------------------------------------- the trainer


def trainer_config(
    shape: Shape, device: torch.device, run_dir: Path, health_every: int, healthd: str = "", checkpoints: str = ""
):
    """A one-rank job of ``shape``; async checkpoints under ``checkpoints`` (else the run dir), never due alone."""
    overrides = {
        "job.name": "gpu-suite",
        "job.run_dir": str(run_dir),
        "model.flavor": shape.flavor,
        "model.n_layers": shape.n_layers,
        "data.source": "stdlib",
        "data.tokenizer": "byte",
        "data.seq_len": shape.seq_len,
        "data.max_tokens": 4 * (shape.warmup_steps + 4 * shape.steps) * shape.batch * (shape.seq_len + 1),
        "training.device": device.type,
        "training.dtype": shape.dtype,
        "training.steps": 10**9,  # the suite drives the steps; the last-step sync save is never due
        "training.global_batch_size": shape.batch,
        "training.microbatch_size": shape.batch,
        "training.warmup_steps": 2,
        "training.lr": 3e-4,
        "training.compile": shape.compile,
        "checkpoint.interval": 10**9,  # saves are started by the checkpoint phase only
        "checkpoint.keep_last": 1,
        "checkpoint.url": checkpoints,
        "checkpoint.resume": "none",
        "health.healthd": healthd,
        "health.golden_every": health_every,
        "health.fingerprint_every": health_every,
        "logging.log_every": 10**9,  # no progress line per step
    }
    return load_config(None, [f"--{key}={value}" for key, value in overrides.items()])


class TrainerRun:
    """One trainer in this process, stepped by the suite through the loop's own step."""

    def __init__(self, cfg) -> None:  # noqa: ANN001 (runtime.config.Config)
        self.trainer = Trainer(cfg)
        self.preemption = PreemptionFlag(self.trainer.events)
        self.device = self.trainer.env.device
        self.tokens_per_step = cfg.training.global_batch_size * cfg.data.seq_len

    def step(self) -> float:
        """One optimizer step (data, forward/backward, the job sync, health, checkpoint cadence); seconds."""
        t0 = time.perf_counter()
        if self.trainer._one_step(self.preemption):
            raise RuntimeError("the trainer was preempted (SIGTERM) during the suite")
        # No device sync here: the job sync inside the step already waits for forward/backward, and the
        # update runs on while the loop fetches the next batch, as in ``Trainer.run``.
        return time.perf_counter() - t0

    def warm_up(self, n: int) -> list[float]:
        """``n`` untimed-for-the-figures steps (compilation happens in the first); their seconds."""
        times = [self.step() for _ in range(n)]
        sync(self.device)
        return times

    def steps(self, n: int, budget: Budget, reserve_s: float) -> list[float]:
        """Up to ``n`` timed steps, fewer (at least 2) when the budget runs short."""
        times: list[float] = []
        while len(times) < n and (len(times) < 2 or budget.left() > reserve_s):
            times.append(self.step())
        sync(self.device)  # the last update finishes before whatever runs next is timed
        return times

    def close(self) -> None:
        """Finish the in-flight save, stop the health clients, free the model and optimizer."""
        self.trainer.close(destroy_group=True)
        self.trainer.events.close()
        del self.trainer
        free_memory(self.device)


def state_tensors(state: dict[str, Any]) -> list[torch.Tensor]:
    """Every tensor of the trainer's checkpointed state (model and optimizer state dicts), each storage once.

    Tied weights (the 1B flavor's embedding and output projection) appear under two keys; the bytes
    that must cross to the host are one copy's.
    """
    found: list[torch.Tensor] = []
    seen: set[tuple[int, int]] = set()

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            key = (value.data_ptr(), value.numel())
            if key not in seen:
                seen.add(key)
                found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    walk({name: item.state_dict() if hasattr(item, "state_dict") else item for name, item in state.items()})
    return found


def checkpoint_dir(requested: str, work: Path, shape: Shape) -> str:
    """The checkpoint phase's store: ``requested``, or for ``auto`` tmpfs when it holds two saves and margin.

    Blocking time does not depend on the store; the steps during the write then see the write's
    host-side work (staging copy, checksums, writer thread) without a slow disk stretching the phase.
    """
    if requested != "auto":
        return requested
    state_bytes = 12 * count_params(get_flavor(shape.flavor))  # fp32 weights + two AdamW moments (full depth)
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2.5 * state_bytes:
        return tempfile.mkdtemp(prefix="gpu-suite-ckpt-", dir=shm)
    return str(work / "checkpoints")


def pinned_copy_seconds(tensors: list[torch.Tensor], repeats: int = 3) -> float | None:
    """Median time of one pinned device-to-host copy of ``tensors`` (buffers allocated once): the floor of a save."""
    on_gpu = [t for t in tensors if t.is_cuda]
    if not on_gpu:
        return None
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in on_gpu]
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for dst, src in zip(pinned, on_gpu, strict=True):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del pinned
    return statistics.median(times[1:])  # the first copy warms up


# ---------------------------------------------------------------------------------- phases


class HfRun:
    """Hugging Face's Llama of the same shape, trained the way its users would: the speed to beat.

    SDPA attention, ``torch.compile`` of the whole model, fp32 master weights under bf16 autocast,
    fused AdamW, the loss (its fp32 logits over the whole vocabulary, as transformers computes it)
    read back every step as the trainer reads its logged scalars.
    """

    def __init__(self, shape: Shape, args: ModelArgs, device: torch.device) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        self.device, self.shape = device, shape
        self.allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        config = LlamaConfig(**hf_config_from_args(args), attn_implementation="sdpa")
        torch.manual_seed(0)
        with torch.device(device):
            self.model = LlamaForCausalLM(config)
        self.model.train()
        self.compute_dtype = getattr(torch, shape.dtype)
        self.fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=3e-4, weight_decay=0.1, fused=self.fused, foreach=not self.fused
        )
        self.forward = torch.compile(self.model) if shape.compile else self.model
        self.inputs = torch.randint(0, args.vocab_size, (shape.batch, shape.seq_len), device=device)
        self.tokens_per_step = shape.batch * shape.seq_len
        self.losses: list[float] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        autocast = self.compute_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=autocast):
            out = self.forward(input_ids=self.inputs, labels=self.inputs)  # transformers shifts the labels
        out.loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        # The logged scalars, read where the trainer's job sync reads its own: after clipping, before the update.
        self.losses.append(torch.stack([out.loss.detach().float(), norm]).tolist()[0])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def steps(self, n: int) -> list[float]:
        """``n`` timed steps, then the last update finishes (untimed, as the trainer's :meth:`TrainerRun.steps`)."""
        times = [self.step() for _ in range(n)]
        sync(self.device)
        return times

    def describe(self) -> dict[str, Any]:
        return {
            "attn_implementation": self.model.config._attn_implementation,
            "compile": self.shape.compile,
            "compute_dtype": str(self.compute_dtype),
            "master_weights": str(next(self.model.parameters()).dtype),
            "optimizer_fused": self.fused,
        }


def mfu_phase(
    run: TrainerRun, shape: Shape, budget: Budget, record: Callable[[dict[str, Any]], None], rounds: int = 2
) -> dict[str, Any]:
    """The trainer and transformers in one process, timed in alternating rounds (medians over all).

    ``record`` keeps the figures measured so far (the trainer's first round) before transformers compiles.
    """
    trainer, device = run.trainer, run.device
    args = trainer.model_args
    peak = trainer.peak_flops or peak_flops(device, 0.0)
    reset_peak(device)
    warm = run.warm_up(shape.warmup_steps)
    ours: dict[str, Any] = {
        "model": {
            "flavor": shape.flavor,
            "params": count_params(args),
            "flops_per_token": flops_per_token(args, shape.seq_len),
        },
        "layout": trainer.dims.as_dict(),
        "compile": shape.compile,
        "compute_dtype": str(trainer.model_step.compute_dtype),
        "master_weights": str(next(iter(trainer.model_step.parameters())).dtype),
        "optimizer_fused": bool(trainer.optimizers.optimizers[0].defaults.get("fused")),
        "sdpa": sdpa_backends(device, args, shape),
        "warmup_seconds": warm,
        "peak_memory_gib": peak_memory_gib(device),
    }
    per_round = max(2, shape.steps // rounds)
    times = run.steps(per_round, budget, reserve_s=90)

    def figures() -> dict[str, Any]:
        return {**ours, **throughput(times, run.tokens_per_step, args, shape.seq_len, peak)}

    record({"stalwart": figures()})  # kept if transformers' compilation runs past the command's limit
    hf: HfRun | None = None
    try:
        hf = HfRun(shape, args, device)
        reset_peak(device)
        theirs = {**hf.describe(), "warmup_seconds": hf.steps(shape.warmup_steps)}
        if device.type == "cuda":
            own = torch.cuda.max_memory_allocated(device) - hf.allocated_before
            theirs["peak_memory_gib"] = own / 2**30  # beyond the trainer's state, resident meanwhile
    except ImportError as e:
        hf, theirs = None, {"status": "skipped", "reason": f"transformers is not importable here: {e}"}
    except Exception as e:  # the baseline failing (a compile error, out of memory) keeps the trainer's figures
        hf, theirs = None, {"status": "error", "reason": f"{type(e).__name__}: {e}", "traceback": format_exc()}
        free_memory(device)
    hf_times: list[float] = []
    for i in range(rounds):  # stalwart, transformers, stalwart, transformers, ...
        if i > 0:
            times += run.steps(per_round, budget, reserve_s=90)
        if hf is not None:
            hf_times += hf.steps(per_round if budget.left() > 90 else 2)
    ours = figures()
    ours["loss_last"] = trainer.history[-1].loss
    result: dict[str, Any] = {"stalwart": ours, "transformers": theirs, "rounds": rounds}
    if hf is not None:
        theirs.update(throughput(hf_times, hf.tokens_per_step, args, shape.seq_len, peak), loss_last=hf.losses[-1])
        result["speedup"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        del hf
        free_memory(device)
    return result


def checkpoint_phase(run: TrainerRun, quiet_steps: int, budget: Budget) -> dict[str, Any]:
    """Blocking time of an async save vs the pinned D2H floor; steps during the write vs just before."""
    trainer = run.trainer
    checkpointer, manager = trainer.checkpointer, trainer.checkpointer.manager
    tensors = state_tensors(trainer.state)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    d2h = pinned_copy_seconds(tensors)
    del tensors
    t0 = time.perf_counter()
    checkpointer.save(trainer.step)  # the first async save allocates the staging cache: not the figure
    first_blocking = time.perf_counter() - t0
    manager.wait()
    before = run.steps(quiet_steps, budget, reserve_s=30)
    t0 = time.perf_counter()
    checkpointer.save(trainer.step)
    blocking = time.perf_counter() - t0
    during: list[float] = []
    while not manager.poll() and budget.left() > 15:  # a slow store must not spend the others' budget
        during.append(run.step())
    write_seconds = time.perf_counter() - t0
    manager.wait()
    # Steps overlapping the write's end run partly without it; a write shorter than one step gives none.
    quiet_rate = 1 / statistics.median(before)
    busy_rate = 1 / statistics.median(during) if during else None
    return {
        "state_bytes": nbytes,
        "state_gib": nbytes / 2**30,
        "pinned_d2h_seconds": d2h,
        "pinned_d2h_gb_per_s": nbytes / d2h / 1e9 if d2h else None,
        "first_save_blocking_seconds": first_blocking,
        "blocking_seconds": blocking,
        "blocking_over_d2h": blocking / d2h if d2h else None,
        "staging_cached": getattr(manager._stager, "cache_staged_state_dict", None),
        "write_seconds": write_seconds,
        "steps_quiet": spread(before),
        "steps_during_write": spread(during) if during else {"n": 0},
        "steps_per_s_quiet": quiet_rate,
        "steps_per_s_during_write": busy_rate,
        "during_over_quiet": busy_rate / quiet_rate if busy_rate else None,
        "storage": manager.storage.base_url,
    }


@contextlib.contextmanager
def healthd_process(run_dir: Path) -> Iterator[str]:
    """A real ``stalwart healthd`` for this node (its hang limits generous: compilation happens in the steps)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    token = run_dir / "token"
    token.write_text("gpu-suite-token\n")
    token.chmod(0o600)
    os.environ[TOKEN_FILE_ENV] = str(token)
    info = run_dir / "health" / "healthd-node0.json"
    info.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "stalwart", "healthd", "--run-dir", str(run_dir), "--token-file", str(token),
        "--node", "0", "--floor-s", "120", "--init-limit-s", "900", "--step-limit-s", "900",
    ]  # fmt: skip
    log = open(run_dir / "healthd.log", "w")  # noqa: SIM115 (closed below, after the process)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not info.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"healthd did not start (exit {proc.poll()}); see {run_dir / 'healthd.log'}")
            time.sleep(0.1)
        yield json.loads(info.read_text())["address"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.environ.pop(TOKEN_FILE_ENV, None)


def health_phase(
    off: TrainerRun, shape: Shape, work: Path, health_every: int, budget: Budget, rounds: int = 2
) -> dict[str, Any]:
    """A second trainer with heartbeats, golden checks and fingerprints on, in rounds alternating with ``off``."""
    run_dir = work / "health-on"
    torch.compiler.reset()  # fresh compiled blocks for the second trainer (no recompile limit reached)
    with healthd_process(run_dir) as address:
        on = TrainerRun(trainer_config(shape, off.device, run_dir, health_every, healthd=address))
        try:
            fingerprints = on.trainer.health.monitor.fingerprint_every > 0
            warm = on.warm_up(shape.warmup_steps)
            warm_off = off.warm_up(2)  # its blocks compile again after the reset
            timed_from = on.trainer.step
            per_round = max(shape.steps // rounds, health_every)  # every round holds a golden check
            on_times: list[float] = []
            off_times: list[float] = []
            for _ in range(rounds):
                off_times += off.steps(per_round, budget, reserve_s=15)
                on_times += on.steps(per_round, budget, reserve_s=15)
            beats = on.trainer.heartbeat is not None
            # Steps whose number the cadence names (the monitor runs the golden workload at each).
            golden_checks = on.trainer.step // health_every - timed_from // health_every if health_every else 0
        finally:
            on.close()
    on_tps = on.tokens_per_step / statistics.median(on_times)
    off_tps = off.tokens_per_step / statistics.median(off_times)
    return {
        "healthd": address,
        "heartbeats": beats,
        "golden_every": health_every,
        "golden_checks_in_timed_steps": golden_checks,
        "fingerprint_every": health_every,
        "fingerprints": "on" if fingerprints else "off: one rank has no data-parallel replica to compare with",
        "warmup_seconds": warm,
        "warmup_seconds_off": warm_off,
        "rounds": rounds,
        "step_seconds": spread(on_times),
        "step_seconds_off": spread(off_times),
        "tokens_per_s_on": on_tps,
        "tokens_per_s_off": off_tps,
        "on_over_off": on_tps / off_tps,
        "off_from": "the mfu phase's trainer (health checks off), stepped in alternating rounds with this one",
    }


def nvml_phase() -> dict[str, Any]:
    """The probes' view of the real GPUs, the raw NVML values behind it, and the lost-GPU path."""
    from stalwart.health.probes import GpuProbe

    probe = GpuProbe()
    report = probe.probe()
    result: dict[str, Any] = {
        "present": report.present,
        "reason": report.reason,
        "xid_subscription": probe._event_set is not None,
        "gpus": [
            {"index": g.index, "name": g.name, "uuid": g.uuid, "issues": [i.__dict__ for i in g.issues]}
            for g in report.gpus
        ],
    }
    if not report.present:
        return result
    import pynvml as nv

    raw = []
    for i in range(nv.nvmlDeviceGetCount()):
        handle = nv.nvmlDeviceGetHandleByIndex(i)
        raw.append({name: nvml_value(query, handle) for name, query in NVML_QUERIES.items()})
    result["raw"] = raw
    lost = GpuProbe(expected_gpus=len(report.gpus) + 1).probe()
    result["dead_gpu_path"] = {
        "expected_gpus": len(report.gpus) + 1,
        "fatal": [i.__dict__ for i in lost.fatal()],
        "reported_lost": any(i.kind == "lost" and i.fatal for i in lost.fatal()),
    }
    return result


def nvml_value(query: Callable[[Any], Any], handle: Any) -> Any:
    """One NVML reading, or why it could not be read (a GPU that lacks the query)."""
    try:
        value = query(handle)
    except Exception as e:  # NVMLError_NotSupported and friends
        return f"error: {e}"
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "_fields_"):
        return {name: getattr(value, name) for name, *_ in value._fields_}
    return value


def _nvml_queries() -> dict[str, Callable[[Any], Any]]:
    def nv() -> Any:
        import pynvml

        return pynvml

    return {
        "temperature_c": lambda h: nv().nvmlDeviceGetTemperature(h, nv().NVML_TEMPERATURE_GPU),
        "power_w": lambda h: nv().nvmlDeviceGetPowerUsage(h) / 1000,
        "power_limit_w": lambda h: nv().nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
        "sm_clock_mhz": lambda h: nv().nvmlDeviceGetClockInfo(h, nv().NVML_CLOCK_SM),
        "mem_clock_mhz": lambda h: nv().nvmlDeviceGetClockInfo(h, nv().NVML_CLOCK_MEM),
        "max_sm_clock_mhz": lambda h: nv().nvmlDeviceGetMaxClockInfo(h, nv().NVML_CLOCK_SM),
        "throttle_reasons": lambda h: hex(nv().nvmlDeviceGetCurrentClocksEventReasons(h)),
        "ecc_mode": lambda h: nv().nvmlDeviceGetEccMode(h),
        "ecc_uncorrected_volatile": lambda h: nv().nvmlDeviceGetTotalEccErrors(
            h, nv().NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv().NVML_VOLATILE_ECC
        ),
        "ecc_corrected_volatile": lambda h: nv().nvmlDeviceGetTotalEccErrors(
            h, nv().NVML_MEMORY_ERROR_TYPE_CORRECTED, nv().NVML_VOLATILE_ECC
        ),
        "row_remap": lambda h: nv().nvmlDeviceGetRemappedRows(h),
        "retired_pages_pending": lambda h: nv().nvmlDeviceGetRetiredPagesPendingStatus(h),
        "pcie_gen": lambda h: nv().nvmlDeviceGetCurrPcieLinkGeneration(h),
        "pcie_width": lambda h: nv().nvmlDeviceGetCurrPcieLinkWidth(h),
        "memory_used_gib": lambda h: nv().nvmlDeviceGetMemoryInfo(h).used / 2**30,
    }


NVML_QUERIES = _nvml_queries()


# --------------------------------------------------------------------------------- summary


def summary(results: dict[str, Any]) -> str:
    """A line per figure, the goals of issue 17 beside them."""
    s, p = results["suite"], results["phases"]
    lines = [
        f"gpu_suite {s['date']} {s['device_name']} ({s['device']}) torch {s['torch']} cuda {s['cuda']} "
        f"transformers {s.get('transformers', '-')} commit {s['commit']} elapsed {s.get('elapsed_s', 0):.0f} s "
        f"of {s['budget_s']:.0f} s",
        f"shape {s['shape']['flavor']} (layers {s['shape']['n_layers'] or 'flavor'}) "
        f"batch {s['shape']['batch']} x {s['shape']['seq_len']}",
    ]

    def line(name: str, render: Callable[[dict[str, Any]], str]) -> None:
        entry = p.get(name)
        if entry is None:
            return
        if entry["status"] == "partial":
            lines.append(f"{name:12s} partial (the run stopped inside this phase): {render(entry)}")
        elif entry["status"] != "ok":
            lines.append(f"{name:12s} {entry['status']}: {entry.get('reason') or entry.get('error')}")
        else:
            lines.append(f"{name:12s} {render(entry)}")

    def rate(e: dict[str, Any]) -> str:
        m = f"{100 * e['mfu']:.1f} %" if e.get("mfu") is not None else "-"
        mem = f"{e['peak_memory_gib']:.1f} GiB" if e.get("peak_memory_gib") is not None else "-"
        st = e["step_seconds"]
        return (
            f"{e['tokens_per_s']:,.0f} tok/s, MFU {m} (goal >= 55 %), peak {mem}, step median "
            f"{st['median']:.4f} s [{st['min']:.4f} .. {st['max']:.4f}] n={st['n']}"
        )

    def speed(e: dict[str, Any]) -> str:
        ours = e["stalwart"]
        theirs = e.get("transformers", {"status": "not reached", "reason": "the run stopped before it"})
        text = f"stalwart {rate(ours)}"
        if "tokens_per_s" not in theirs:
            return f"{text}\n{'':13s}transformers {theirs['status']}: {theirs['reason']}"
        return (
            f"{text}\n{'':13s}transformers {rate(theirs)}\n{'':13s}stalwart / transformers tokens/s "
            f"{e['speedup']:.3f} (goal >= 1.25), {e['rounds']} alternating rounds"
        )

    line("mfu", speed)

    def ckpt(e: dict[str, Any]) -> str:
        d2h = f"{e['pinned_d2h_seconds']:.3f} s" if e["pinned_d2h_seconds"] else "- (CPU state)"
        ratio = f"{e['blocking_over_d2h']:.2f}" if e["blocking_over_d2h"] else "-"
        during = (
            f"{100 * (e['during_over_quiet'] - 1):+.1f} %" if e["during_over_quiet"] else "- (no step in the write)"
        )
        return (
            f"state {e['state_gib']:.2f} GiB: pinned D2H {d2h}, async blocking {e['blocking_seconds']:.3f} s, "
            f"blocking/D2H {ratio} (goal <= 1.2); write {e['write_seconds']:.1f} s, steps/s during write {during} "
            f"(goal within 5 %)"
        )

    line("checkpoint", ckpt)
    line(
        "health",
        lambda e: (
            f"on/off tokens/s {e['on_over_off']:.4f} (goal >= 0.99): heartbeats {e['heartbeats']}, golden every "
            f"{e['golden_every']}, fingerprints {e['fingerprints']}"
        ),
    )

    def nvml(e: dict[str, Any]) -> str:
        if not e["present"]:
            return f"no GPU through NVML ({e['reason']})"
        first = e["raw"][0]
        lost = e["dead_gpu_path"]["reported_lost"]
        return (
            f"{len(e['gpus'])} GPU(s) {e['gpus'][0]['name']}: {first['temperature_c']} C, {first['power_w']} W, "
            f"SM {first['sm_clock_mhz']} MHz, ECC uncorrected {first['ecc_uncorrected_volatile']}, remap "
            f"{first['row_remap']}, XID subscription {e['xid_subscription']}, missing GPU reported lost: {lost}"
        )

    line("nvml", nvml)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_suite.json and summary.txt")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--budget-s", type=float, default=None, help="global time budget (default 240 CUDA, 120 CPU)")
    parser.add_argument("--work-dir", type=Path, default=None, help="run dirs (default: a temp dir, removed after)")
    parser.add_argument(
        "--checkpoint-dir",
        default="auto",
        help="where the checkpoint phase writes: auto picks /dev/shm when it holds 2.5 states (else the work dir)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default by device)")
    parser.add_argument("--health-every", type=int, default=None, help="golden/fingerprint cadence of phase 4")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the trainer's blocks and the transformers model (auto: on CUDA only)",
    )
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="compute dtype (auto: bf16 on CUDA)"
    )
    args = parser.parse_args()

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; this torch sees none (use --device cpu)")
    shape = CUDA_SHAPE if device.type == "cuda" else CPU_SHAPE
    overrides: dict[str, Any] = {}
    if args.steps:
        overrides["steps"] = args.steps
    if args.compile != "auto":
        overrides["compile"] = args.compile == "on"
    if args.dtype != "auto":
        overrides["dtype"] = args.dtype
    shape = Shape(**{**shape.__dict__, **overrides})
    health_every = args.health_every or (10 if device.type == "cuda" else 2)
    budget = Budget(args.budget_s if args.budget_s is not None else (240.0 if device.type == "cuda" else 120.0))
    args.out.mkdir(parents=True, exist_ok=True)
    suite = Suite(args.out, device, shape, budget)
    suite.write()
    # Phase costs (compile included) by device: what each needs left of the budget before it starts.
    needs = {"mfu": 200, "checkpoint": 60, "health": 60} if device.type == "cuda" else {}

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    runs: list[TrainerRun] = []  # the mfu phase's trainer, kept for the checkpoint and health phases

    checkpoints = checkpoint_dir(args.checkpoint_dir, work, shape)

    def first_phase() -> dict[str, Any]:
        runs.append(TrainerRun(trainer_config(shape, device, work / "health-off", 0, checkpoints=checkpoints)))
        return mfu_phase(runs[0], shape, budget, record=lambda partial: suite.partial("mfu", partial))

    try:
        suite.run_phase("nvml", 0, nvml_phase)
        speed = suite.run_phase("mfu", needs.get("mfu", 0), first_phase)
        if speed is not None:
            suite.run_phase(
                "checkpoint", needs.get("checkpoint", 0), lambda: checkpoint_phase(runs[0], shape.steps, budget)
            )
            suite.run_phase(
                "health", needs.get("health", 0), lambda: health_phase(runs[0], shape, work, health_every, budget)
            )
        else:
            for name in ("checkpoint", "health"):
                suite.skip(name, "it steps the mfu phase's trainer, and the mfu phase did not complete")
    finally:
        while runs:
            runs.pop().close()
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        if args.checkpoint_dir == "auto":
            shutil.rmtree(checkpoints, ignore_errors=True)
    suite.write()
    print(summary(suite.results), end="", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
