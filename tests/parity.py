"""Single-process reference training and comparison helpers shared by every parity test.

A parallel run must reproduce ``reference_run`` on the same model, seed and batches: the losses
of every step and the final parameters, within ``RTOL`` relative (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stalwart.model.args import ModelArgs, get_flavor
from stalwart.parallel.loss import cross_entropy_loss
from stalwart.runtime.train import build_model

RTOL = 1e-4
SEED = 1234
LR = 1e-3
MAX_GRAD_NORM = 1.0


def debug_args(n_layers: int = 2) -> ModelArgs:
    import dataclasses

    return dataclasses.replace(get_flavor("debug"), n_layers=n_layers)


def make_batches(
    vocab_size: int, steps: int = 5, batch: int = 4, seq_len: int = 32, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
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
        loss = cross_entropy_loss(logits, labels)
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


def assert_close_runs(got: RunResult, ref: RunResult, rtol: float = RTOL, params_normwise: bool = False) -> None:
    """Losses and grad norms elementwise; parameters elementwise or, with ``params_normwise``, per tensor.

    ``params_normwise`` checks ``‖got − ref‖ ≤ rtol·‖ref‖`` for each parameter. Use it where the
    parallel layout reorders large reductions (TP): AdamW's ``m/√v`` turns fp32 rounding in a
    near-zero gradient into an O(lr·1e-3) change of that one element, which an elementwise
    1e-6 tolerance rejects although the model is the same.
    """
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(ref.losses), rtol=rtol, atol=0)
    torch.testing.assert_close(torch.tensor(got.grad_norms), torch.tensor(ref.grad_norms), rtol=rtol, atol=0)
    assert got.params.keys() == ref.params.keys(), (sorted(got.params), sorted(ref.params))
    for k in ref.params:
        if params_normwise:
            assert got.params[k].shape == ref.params[k].shape, (k, got.params[k].shape, ref.params[k].shape)
            err = torch.linalg.vector_norm(got.params[k] - ref.params[k]) / torch.linalg.vector_norm(ref.params[k])
            assert err <= rtol, f"{k}: relative norm error {err.item():.3g} > {rtol}"
        else:
            torch.testing.assert_close(
                got.params[k], ref.params[k], rtol=rtol, atol=rtol * 1e-2, msg=lambda m, k=k: f"{k}: {m}"
            )


def parallel_run(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    loss_parallel: bool = False,
    dp_mesh=None,
    forward=None,
) -> RunResult:
    """Train an already-parallelised ``model`` on the same global batches as ``reference_run``.

    Mirrors ``Trainer.train_step``: the project's ``cross_entropy_loss`` (vocab-sharded logits under
    ``loss_context``), gradient clipping over DTensor grads, AdamW. With ``dp_mesh`` each rank takes
    its contiguous slice of the global batch and the reported loss is averaged over ``dp_mesh``
    (gradients are averaged by FSDP/DDP). ``forward(model, inputs)`` defaults to ``model(inputs)``.
    Final parameters are gathered to full tensors.
    """
    import torch.distributed as dist

    from stalwart.parallel.loss import cross_entropy_loss, loss_context

    opt = make_optimizer(model.parameters())
    losses, norms = [], []
    for inputs, labels in batches:
        if dp_mesh is not None:
            rank, size = dp_mesh.get_local_rank(), dp_mesh.size()
            inputs, labels = inputs.chunk(size)[rank], labels.chunk(size)[rank]
        with loss_context(loss_parallel):
            logits = forward(model, inputs) if forward is not None else model(inputs)
            loss = cross_entropy_loss(logits, labels)
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if dp_mesh is not None:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=dp_mesh.get_group())
        losses.append(loss.item())
        norms.append(norm.item())
    return RunResult(losses, norms, full_state_dict(model))
