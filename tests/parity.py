"""Single-process reference training and comparison helpers shared by every parity test.

A parallel run must reproduce ``reference_run`` on the same model, seed and batches: the losses
of every step and the final parameters, within ``RTOL`` relative (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stalwart.model.args import ModelArgs, get_flavor
from stalwart.runtime.train import build_model

RTOL = 1e-4
SEED = 1234
LR = 1e-3
MAX_GRAD_NORM = 1.0


def debug_args(n_layers: int = 2) -> ModelArgs:
    import dataclasses

    return dataclasses.replace(get_flavor("debug"), n_layers=n_layers)


def make_batches(vocab_size: int, steps: int = 5, batch: int = 4, seq_len: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of (inputs, labels), deterministic."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=g)
        out.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def make_optimizer(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(params), lr=LR, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)


@dataclass
class RunResult:
    losses: list[float]
    grad_norms: list[float]
    params: dict[str, torch.Tensor]


def reference_run(args: ModelArgs, batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int = SEED) -> RunResult:
    """Plain single-process fp32 training: the ground truth for parity."""
    model = build_model(args, torch.device("cpu"), seed)
    opt = make_optimizer(model.parameters())
    losses, norms = [], []
    for inputs, labels in batches:
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        norms.append(norm.item())
    return RunResult(losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()})


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters gathered to full tensors (DTensor shards included), on CPU."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach().cpu().clone()
    return out


def assert_close_runs(got: RunResult, ref: RunResult, rtol: float = RTOL) -> None:
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=rtol, atol=0)
    torch.testing.assert_close(torch.tensor(got.grad_norms), torch.tensor(ref.grad_norms), rtol=rtol, atol=0)
    assert got.params.keys() == ref.params.keys(), (sorted(got.params), sorted(ref.params))
    for k in ref.params:
        torch.testing.assert_close(got.params[k], ref.params[k], rtol=rtol, atol=rtol * 1e-2, msg=lambda m, k=k: f"{k}: {m}")
