"""Activation checkpointing keeps fewer activations, the same numbers and the same checkpoint names.

Numerical parity under every parallel layout is in test_trainer_parity.py (ac_* and compile_*).
"""

from __future__ import annotations

import pytest
import torch
from parity import debug_args
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.utils._python_dispatch import TorchDispatchMode

from stalwart.model.llama import Transformer
from stalwart.parallel.activation_checkpoint import apply_ac


def build(mode: str, every: int = 2) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(debug_args(n_layers=4))
    model.init_weights(seed=0)
    apply_ac(model, mode, every)
    return model


class MatmulCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def run(model: Transformer, tokens: torch.Tensor) -> tuple[int, int]:
    """(bytes autograd keeps from forward for backward, parameters excluded; matmuls run in backward).

    A checkpointed block shows up here only with its input: what it keeps inside is its own.
    """
    params = {p.data_ptr() for p in model.parameters()}
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if t.data_ptr() not in params:
            saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens).sum()
    with MatmulCounter() as counter:
        loss.backward()
    return saved, counter.count


def test_each_mode_trades_kept_activations_for_recomputation_with_the_same_gradients():
    tokens = torch.randint(0, 264, (2, 64), generator=torch.Generator().manual_seed(1))
    saved, backward_matmuls, grads = {}, {}, {}
    for mode in ("none", "selective-layer", "selective-op", "full"):
        model = build(mode)
        saved[mode], backward_matmuls[mode] = run(model, tokens)
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    assert saved["full"] == saved["selective-op"] < saved["selective-layer"] < saved["none"], saved
    # Full recomputes every block's matmuls in backward; selective-op saved their outputs.
    assert (
        backward_matmuls["none"]
        == backward_matmuls["selective-op"]
        < backward_matmuls["selective-layer"]
        < backward_matmuls["full"]
    ), backward_matmuls
    for mode in ("selective-layer", "selective-op", "full"):
        for g, ref in zip(grads[mode], grads["none"]):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["full", "selective-layer", "selective-op"])
def test_checkpoint_names_do_not_depend_on_the_mode(mode):
    assert set(get_model_state_dict(build(mode))) == set(get_model_state_dict(build("none")))


def test_selective_layer_wraps_every_nth_block_by_global_index():
    model = build("selective-layer", every=2)
    wrapped = [name for name, block in model.layers.items() if type(block).__name__ == "CheckpointWrapper"]
    assert wrapped == ["0", "2"]


def test_bad_modes_name_the_choices():
    with pytest.raises(ValueError, match="choose none, full, selective-layer or selective-op"):
        build("some")
    with pytest.raises(ValueError, match="must be >= 1"):
        build("selective-layer", every=0)
