"""Llama 3 model: HF logits parity, checkpoint adapter, published counts, FLOPs, init and positions."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from stalwart.model.args import FLAVORS, ModelArgs, RopeScaling, get_flavor
from stalwart.model.flops import count_params, flops_per_token, mfu
from stalwart.model.hf import (
    args_from_hf_config,
    from_hf,
    hf_config_from_args,
    load_hf_checkpoint,
    save_hf_checkpoint,
    to_hf,
)
from stalwart.model.llama import Transformer
from stalwart.model.rope import rope_frequencies

# Small GQA model whose rope scaling touches every band: with head_dim 16 and
# theta 5e5 the wavelengths are ~6 (< 64/4, kept), ~32 (smoothed) and >= 167 (> 64, scaled).
SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
TINY = ModelArgs(
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=128,
    norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=SCALING,
    max_seq_len=256,
    ffn_hidden_dim_override=160,
)
SEQ_LEN = 128


def _hf_model(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def _hf_logits(model, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def _ours(args: ModelArgs, state_dict: dict[str, Tensor]) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights(seed=1)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _logits(model: Transformer, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
    with torch.no_grad():
        return model(tokens, positions)


def _tokens(vocab_size: int, seq_len: int, batch: int = 2) -> Tensor:
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(3))


def _hf_weights(hf_model, tied: bool) -> dict[str, Tensor]:
    """What a HF safetensors export holds: a tied lm_head is not serialised."""
    return {k: v for k, v in hf_model.state_dict().items() if not (tied and k == "lm_head.weight")}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_transformers(tied: bool) -> None:
    hf_model = _hf_model(tied)
    args = dataclasses.replace(TINY, tie_embeddings=tied)
    assert args_from_hf_config(hf_model.config.to_dict()) == args
    hf_weights = _hf_weights(hf_model, tied)
    ours = _ours(args, from_hf(hf_weights, args))
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied

    tokens = _tokens(args.vocab_size, SEQ_LEN)
    expected = _hf_logits(hf_model, tokens)
    torch.testing.assert_close(_logits(ours, tokens), expected, atol=1e-5, rtol=1e-5)

    back = to_hf(from_hf(hf_weights, args), args)
    assert back.keys() == hf_weights.keys()
    for name, tensor in hf_weights.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_and_load_hf_checkpoint_round_trip(tied: bool, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    hf_model = _hf_model(tied)
    args = dataclasses.replace(TINY, tie_embeddings=tied)
    ours = _ours(args, from_hf(_hf_weights(hf_model, tied), args))
    tokens = _tokens(args.vocab_size, SEQ_LEN)
    expected = _logits(ours, tokens)

    save_hf_checkpoint(ours.state_dict(), args, tmp_path)
    loaded_args, loaded_state = load_hf_checkpoint(tmp_path)
    assert loaded_args == args
    torch.testing.assert_close(_logits(_ours(loaded_args, loaded_state), tokens), expected, atol=0, rtol=0)

    reloaded_hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(_hf_logits(reloaded_hf, tokens), expected, atol=1e-5, rtol=1e-5)


def test_load_sharded_transformers_export(tmp_path: Path) -> None:
    hf_model = _hf_model(tied=False)
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1

    args, state = load_hf_checkpoint(tmp_path)
    tokens = _tokens(args.vocab_size, 32)
    torch.testing.assert_close(_logits(_ours(args, state), tokens), _hf_logits(hf_model, tokens), atol=1e-5, rtol=1e-5)


def test_load_hf_checkpoint_errors_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_checkpoint(tmp_path)
    config = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 128,
        "intermediate_size": 160,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors in .*Hugging Face Llama checkpoint folder"):
        load_hf_checkpoint(tmp_path)


def test_rope_scaling_keeps_smooths_and_scales_bands() -> None:
    plain = rope_frequencies(16, 500000.0, None)
    scaled = rope_frequencies(16, 500000.0, SCALING)
    assert scaled[0] == plain[0]
    assert plain[1] / 8 < scaled[1] < plain[1]
    torch.testing.assert_close(scaled[2:], plain[2:] / 8)


PUBLISHED_PARAMS = {
    "1B": 1_235_814_400,
    "3B": 3_212_749_824,
    "8B": 8_030_261_248,
    "70B": 70_553_706_496,
    "405B": 405_853_388_800,
}
PUBLISHED_INTERMEDIATE = {"1B": 8192, "3B": 8192, "8B": 14336, "70B": 28672, "405B": 53248}


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS))
def test_param_counts_match_published(name: str) -> None:
    args = get_flavor(name)
    assert args.ffn_hidden_dim == PUBLISHED_INTERMEDIATE[name]
    assert count_params(args) == PUBLISHED_PARAMS[name]
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name]  # tied counted once


def test_flops_per_token_8b_by_hand() -> None:
    # N' = all 8,030,261,248 params minus the 128256 x 4096 input embedding.
    n_prime = 8_030_261_248 - 128_256 * 4_096  # 7,504,924,672
    attention = 12 * 32 * 32 * 128 * 8192  # 12 * L * H * Dh * S = 12,884,901,888
    expected = 6 * n_prime + attention  # 57,914,449,920
    assert expected == 57_914_449_920
    assert flops_per_token(get_flavor("8B"), 8192) == expected
    assert mfu(1000.0, get_flavor("8B"), 8192, peak_flops=1e15) == pytest.approx(expected * 1000.0 / 1e15)


def test_tied_flops_count_shared_matrix_once() -> None:
    args = get_flavor("1B")
    assert flops_per_token(args, 1) == 6 * count_params(args) + 12 * 16 * 32 * 64


def _debug_model(seed: int = 0, **changes) -> Transformer:
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(get_flavor("debug"), **changes))
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model.eval()


def test_meta_build_and_init_weights() -> None:
    model = _debug_model()
    assert "rope_cache" not in model.state_dict()
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in model.parameters())
    assert torch.equal(model.layers["0"].attention_norm.weight, torch.ones(128))
    wo_std = [model.layers[str(i)].attention.wo.weight.std().item() for i in (0, 3)]
    assert wo_std[0] == pytest.approx(0.02 / math.sqrt(2), rel=0.1)
    assert wo_std[1] == pytest.approx(0.02 / math.sqrt(8), rel=0.1)

    same = _debug_model()
    for (name, a), b in zip(model.state_dict().items(), same.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(_debug_model(seed=1).tok_embeddings.weight, model.tok_embeddings.weight)

    tied = _debug_model(tie_embeddings=True)
    assert tied.output.weight is tied.tok_embeddings.weight


def test_positions_select_rope_rows() -> None:
    model = _debug_model()
    tokens = _tokens(264, 16)
    default = _logits(model, tokens)
    assert torch.equal(_logits(model, tokens, torch.arange(16)), default)
    # Rope is relative: shifting every position leaves attention, hence logits, unchanged.
    torch.testing.assert_close(_logits(model, tokens, torch.arange(16) + 100), default, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(model, tokens, torch.arange(16).flip(0)), default, atol=1e-3)


def test_pipeline_pruned_stages_compose() -> None:
    model = _debug_model()
    tokens = _tokens(264, 16)
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    for layer_id in ("2", "3"):
        del first.layers[layer_id]
    for layer_id in ("0", "1"):
        del last.layers[layer_id]
    first.norm = first.output = None
    last.tok_embeddings = None
    with torch.no_grad():
        hidden = first(tokens)
        assert hidden.shape == (2, 16, 128)
        torch.testing.assert_close(last(hidden), _logits(model, tokens), atol=1e-6, rtol=1e-6)


def test_bf16_forward() -> None:
    model = _debug_model().to(torch.bfloat16)
    model.init_buffers()
    tokens = _tokens(264, 16)
    logits = _logits(model, tokens)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    reference = _logits(_debug_model(), tokens)
    torch.testing.assert_close(logits.float(), reference, atol=0.05, rtol=0.05)


def test_get_flavor_rejects_unknown_names_listing_valid_ones() -> None:
    assert get_flavor("8B") is FLAVORS["8B"]
    with pytest.raises(ValueError, match="bogus.*debug, 1B, 3B, 8B, 70B, 405B"):
        get_flavor("bogus")


@pytest.mark.parametrize("flavor", ["debug", "1B", "8B"])
def test_exported_config_loads_in_transformers_without_warnings(flavor: str, tmp_path: Path) -> None:
    import logging

    import transformers

    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_args(get_flavor(flavor))))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    try:
        transformers.AutoConfig.from_pretrained(tmp_path)
    finally:
        root.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
