"""Per-step throughput, MFU and memory figures, and the one progress line they print as."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

# Dense bf16 peak (no sparsity) by device-name substring, for MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_flops(device: torch.device, configured_tflops: float) -> float | None:
    """Peak FLOP/s of one device: the configured value, a known GPU's, or None (no MFU on CPU)."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


@dataclass
class StepMetrics:
    step: int
    total_steps: int
    loss: float
    grad_norm: float
    lr: float
    step_seconds: float
    data_seconds: float
    tokens: int
    """Tokens processed by the whole job in this step."""
    world_size: int
    mfu: float | None
    memory: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.step_seconds if self.step_seconds > 0 else 0.0

    def event_fields(self) -> dict[str, float | int | None]:
        """The ``step_end`` event's kind-specific fields (schema in events.py)."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "lr": self.lr,
            "step_seconds": self.step_seconds,
            "data_seconds": self.data_seconds,
            "tokens_per_second": self.tokens_per_second,
            "mfu": self.mfu,
        }

    def line(self) -> str:
        mfu = f"{100 * self.mfu:5.1f}%" if self.mfu is not None else "  -  "
        return (
            f"step {self.step:>{len(str(self.total_steps))}}/{self.total_steps} | loss {self.loss:7.4f} | "
            f"grad_norm {self.grad_norm:7.3f} | lr {self.lr:.2e} | tok/s {self.tokens_per_second:10,.0f} | "
            f"mfu {mfu} | mem {self.memory / 2**20:7,.0f} MiB"
        )
