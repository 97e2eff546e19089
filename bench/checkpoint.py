"""Checkpoint save cost: blocking vs total time, async vs sync, and training speed during a write.

    python bench/checkpoint.py [--size-mb 256] [--device cpu|cuda] [--repeats 3] [--tiers]

For a state of ``--size-mb`` MiB (fp32 tensors of 16 MiB each) written through
:class:`~stalwart.checkpoint.manager.CheckpointManager` to a temporary directory, prints the median of
``--repeats`` saves of: sync save time; async blocking time (what the training loop waits for) and
total time until the step is committed. With ``--tiers`` also the host-memory tier's blocking time.

On CUDA the state lives on the GPU, async saves stage into pinned host memory that is allocated
once and reused (``cache_staging=True``, DCP's ``BlockingAsyncStager`` with pinned buffers), and
the pinned device-to-host copy time of the state is measured on its own: the floor no save can
beat. The script prints blocking / D2H (goal: at most 1.2).

Throughput: a fixed MLP training step (forward, backward, AdamW) on the same device, steps per
second without any save and while the async write of the state runs in the background.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime

import torch

from stalwart.checkpoint.manager import CheckpointManager
from stalwart.checkpoint.memory_tier import MemoryTier

TENSOR_MB = 16


def make_state(size_mb: int, device: torch.device) -> dict[str, torch.Tensor]:
    n = max(1, size_mb // TENSOR_MB)
    return {f"w{i}": torch.randn(TENSOR_MB << 18, device=device) for i in range(n)}  # 2^18 fp32 = 1 MiB


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def d2h_seconds(state: dict[str, torch.Tensor], repeats: int) -> float:
    """Median time of a pinned device-to-host copy of the whole state (buffers allocated once)."""
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in state.items()}
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k, v in state.items():
            pinned[k].copy_(v, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first copy warms up


class Workload:
    """A fixed training step: an MLP forward/backward and an AdamW update."""

    def __init__(self, device: torch.device, width: int = 1024, depth: int = 4, batch: int = 128) -> None:
        torch.manual_seed(0)
        layers = [m for _ in range(depth) for m in (torch.nn.Linear(width, width), torch.nn.GELU())]
        self.model = torch.nn.Sequential(*layers).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(batch, width, device=device)
        self.device = device

    def step(self) -> None:
        self.model(self.x).square().mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync_device(self.device)

    def rate(self, seconds: float, until=None) -> tuple[float, int]:
        """Steps per second for ``seconds`` (or until ``until()`` is true, at least 3 steps)."""
        t0, n = time.perf_counter(), 0
        while n < 3 or (until() is False if until else time.perf_counter() - t0 < seconds):
            self.step()
            n += 1
        return n / (time.perf_counter() - t0), n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="DCP writer threads per rank")
    parser.add_argument("--tiers", action="store_true", help="also time the host-memory tier's save")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; this torch sees none (use --device cpu)")
    state = make_state(args.size_mb, device)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(
        f"# {datetime.now(UTC):%Y-%m-%d} {platform.machine()} {torch.__version__} device={device} "
        f"cpus={torch.get_num_threads()} state={nbytes / 2**20:.0f} MiB in {len(state)} tensors"
    )

    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        manager = CheckpointManager(
            f"{tmp}/ckpt", keep_last=1, thread_count=args.threads, cache_staging=device.type == "cuda"
        )
        sync, blocking, total = [], [], []
        step = 0
        for _ in range(args.repeats):
            step += 1
            t0 = time.perf_counter()
            manager.save(step, state)
            sync.append(time.perf_counter() - t0)
        for i in range(
            args.repeats + (1 if device.type == "cuda" else 0)
        ):  # on CUDA the first save allocates the pinned cache
            step += 1
            t0 = time.perf_counter()
            manager.save(step, state, async_=True)
            b = time.perf_counter() - t0
            manager.wait()
            if device.type != "cuda" or i > 0:
                blocking.append(b)
                total.append(time.perf_counter() - t0)
        med = statistics.median
        print(f"sync save         {med(sync):8.3f} s   ({nbytes / med(sync) / 1e9:.2f} GB/s)")
        print(f"async blocking    {med(blocking):8.3f} s")
        print(f"async total       {med(total):8.3f} s   (until committed)")
        if device.type == "cuda":
            d2h = d2h_seconds(state, args.repeats)
            print(f"pinned D2H copy   {d2h:8.3f} s   ({nbytes / d2h / 1e9:.1f} GB/s)")
            print(f"blocking / D2H    {med(blocking) / d2h:8.2f}     (goal <= 1.2)")
        if args.tiers:
            memory = MemoryTier(f"{tmp}/shm", "bench")
            mem_blocking = []
            for _ in range(args.repeats):
                step += 1
                t0 = time.perf_counter()
                memory.save(step, state)
                mem_blocking.append(time.perf_counter() - t0)
                memory.wait()
            print(f"memory-tier block {med(mem_blocking):8.3f} s")
            memory.close()

        work = Workload(device)
        work.rate(1.0)  # warm-up
        quiet, _ = work.rate(3.0)
        step += 1
        manager.save(step, state, async_=True)
        busy, n = work.rate(0.0, until=manager.poll)
        manager.wait()
        print(f"steps/s quiet     {quiet:8.2f}")
        print(f"steps/s writing   {busy:8.2f}   ({(busy / quiet - 1) * 100:+.1f} %, {n} steps during the write)")
        manager.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
