"""Hugging Face `LlamaForCausalLM` checkpoint adapter: names, rope permutation, config.json.

Our rope pairs adjacent channels (Meta's convention) while HF rotates halves, so
q/k projection rows are permuted on the way in and out; everything else is a rename.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from stalwart.errors import MissingInputError
from stalwart.model.args import FLAVORS, ModelArgs, RopeScaling, hf_shape

_CONFIG_FILE = "config.json"
_INDEX_FILE = "model.safetensors.index.json"
_WEIGHTS_FILE = "model.safetensors"
_CHECKPOINT_HINT = "expected a Hugging Face Llama checkpoint folder (config.json + *.safetensors)"

_TOP_LEVEL = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_ROTARY = {"attention.wq.weight", "attention.wk.weight"}
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Non-weights that some older HF exports serialised; they are recomputed, never loaded.
_HF_IGNORED = re.compile(r"\.rotary_emb\.inv_freq$")


def _interleaved_to_half(w: Tensor, head_dim: int) -> Tensor:
    """Reorder each head's output rows from (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...)."""
    n_heads = w.shape[0] // head_dim
    return w.reshape(n_heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def _half_to_interleaved(w: Tensor, head_dim: int) -> Tensor:
    n_heads = w.shape[0] // head_dim
    return w.reshape(n_heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)


def to_hf(state_dict: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Our names -> HF names. Partial dicts (pipeline stages) convert key by key.

    With tied embeddings HF stores only `model.embed_tokens.weight`, so `output.weight`
    is dropped when the embedding is present (and stands in for it otherwise).
    """
    out: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        if name == "output.weight" and args.tie_embeddings:
            if "tok_embeddings.weight" not in state_dict:
                out[_TOP_LEVEL["tok_embeddings.weight"]] = tensor
            continue
        if name in _TOP_LEVEL:
            out[_TOP_LEVEL[name]] = tensor
            continue
        match = _OURS_LAYER.match(name)
        if match is None or match.group(2) not in _PER_LAYER:
            raise KeyError(f"to_hf: unexpected parameter {name!r}; only Llama 3 Transformer state dicts convert")
        layer, suffix = match.groups()
        if suffix in _ROTARY:
            tensor = _interleaved_to_half(tensor, args.head_dim)
        out[f"model.layers.{layer}.{_PER_LAYER[suffix]}"] = tensor
    return out


def from_hf(hf_state_dict: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """HF names -> our names; the inverse of `to_hf`.

    With tied embeddings `output.weight` aliases the embedding tensor (so a strict
    `load_state_dict` is satisfied) and any serialised `lm_head.weight` is ignored.
    """
    top_level = {hf: ours for ours, hf in _TOP_LEVEL.items()}
    per_layer = {hf: ours for ours, hf in _PER_LAYER.items()}
    out: dict[str, Tensor] = {}
    for name, tensor in hf_state_dict.items():
        if _HF_IGNORED.search(name) or (name == "lm_head.weight" and args.tie_embeddings):
            continue
        if name in top_level:
            out[top_level[name]] = tensor
            continue
        match = _HF_LAYER.match(name)
        if match is None or match.group(2) not in per_layer:
            raise KeyError(
                f"from_hf: unexpected tensor {name!r}; only LlamaForCausalLM checkpoints "
                "(no biases, no adapters) are supported"
            )
        layer, hf_suffix = match.groups()
        suffix = per_layer[hf_suffix]
        if suffix in _ROTARY:
            tensor = _half_to_interleaved(tensor, args.head_dim)
        out[f"layers.{layer}.{suffix}"] = tensor
    if args.tie_embeddings and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def _ffn_parameterisation(base: ModelArgs, intermediate_size: int) -> ModelArgs:
    """Express the FFN width like the published flavor of the same dim, else via the override."""
    for flavor in FLAVORS.values():
        if flavor.dim != base.dim or flavor.ffn_hidden_dim_override is not None:
            continue
        candidate = dataclasses.replace(
            base, multiple_of=flavor.multiple_of, ffn_dim_multiplier=flavor.ffn_dim_multiplier
        )
        if candidate.ffn_hidden_dim == intermediate_size:
            return candidate
    return dataclasses.replace(base, ffn_hidden_dim_override=intermediate_size)


def _rope_from_hf(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read rope settings from either transformers v4 (`rope_scaling`) or v5 (`rope_parameters`) configs."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"unsupported rope_type {rope_type!r} in config.json; only 'default' and 'llama3' (Llama 3.x) are supported"
        )
    scaling = RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
    return theta, scaling


def args_from_hf_config(config: dict[str, Any]) -> ModelArgs:
    """Translate a HF `LlamaConfig` dict (config.json) into ModelArgs, rejecting non-Llama-3 features."""
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json has model_type {config.get('model_type')!r}; {_CHECKPOINT_HINT}")
    unsupported = {
        "hidden_act": config.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(config.get("attention_bias", False)),
        "mlp_bias": bool(config.get("mlp_bias", False)),
    }
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"config.json sets {bad}, which Llama 3 does not use; only silu MLPs without biases load")
    try:
        dim = int(config["hidden_size"])
        n_heads = int(config["num_attention_heads"])
        rope_theta, rope_scaling = _rope_from_hf(config)
        base = ModelArgs(
            dim=dim,
            n_layers=int(config["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            vocab_size=int(config["vocab_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
        intermediate_size = int(config["intermediate_size"])
    except KeyError as missing:
        raise ValueError(f"config.json lacks {missing}; {_CHECKPOINT_HINT}") from None
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) != base.head_dim:
        raise ValueError(
            f"config.json head_dim {head_dim} != hidden_size / num_attention_heads = {base.head_dim}; "
            "Llama 3 requires them equal"
        )
    return _ffn_parameterisation(base, intermediate_size)


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """config.json contents for `args`, readable by transformers v4 and v5."""
    scaling = args.rope_scaling
    context = args.max_seq_len
    if scaling is not None and context <= scaling.original_max_position_embeddings:
        # A small model with Llama 3.1's scaling (the debug flavor): transformers requires the context to exceed
        # the original one; the scaled rope is made for original × factor positions (and is the same at any length).
        context = int(scaling.original_max_position_embeddings * scaling.factor)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **hf_shape(args),
        "max_position_embeddings": context,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None if scaling is None else {"rope_type": "llama3", **dataclasses.asdict(scaling)},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if dtype is not None:
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / _INDEX_FILE
    if index.exists():
        shards = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        missing = [shard.name for shard in shards if not shard.exists()]
        if missing:
            raise MissingInputError(
                f"{index} lists shards missing from {folder}: {missing}; download the complete checkpoint"
            )
        return shards
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MissingInputError(
            f"no *.safetensors in {folder}; {_CHECKPOINT_HINT}. Convert .bin/.pth checkpoints with "
            "transformers' save_pretrained(..., safe_serialization=True)"
        )
    return files


def load_hf_checkpoint(folder: str | Path) -> tuple[ModelArgs, dict[str, Tensor]]:
    """Read a (possibly sharded) HF Llama checkpoint folder into ModelArgs and our state dict."""
    from stalwart.model.llama import Transformer  # the model defines which weights must be present

    folder = Path(folder)
    config_path = folder / _CONFIG_FILE
    if not config_path.is_file():
        raise MissingInputError(f"no {_CONFIG_FILE} in {folder}; {_CHECKPOINT_HINT}")
    args = args_from_hf_config(json.loads(config_path.read_text()))
    hf_state_dict: dict[str, Tensor] = {}
    for path in _safetensors_files(folder):
        hf_state_dict.update(load_file(path))
    state_dict = from_hf(hf_state_dict, args)
    with torch.device("meta"):
        expected = set(Transformer(args).state_dict())
    missing = sorted(expected - state_dict.keys())
    if missing:
        raise ValueError(
            f"checkpoint in {folder} lacks {len(missing)} tensors (e.g. {missing[:3]}); "
            "is the shard set complete and does config.json match the weights?"
        )
    return args, state_dict


def save_hf_checkpoint(state_dict: dict[str, Tensor], args: ModelArgs, folder: str | Path) -> None:
    """Write config.json + a single model.safetensors that `LlamaForCausalLM.from_pretrained` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / _INDEX_FILE).exists():
        raise FileExistsError(
            f"{folder} already holds a sharded checkpoint ({_INDEX_FILE}) that would shadow the new one; "
            "save into an empty folder"
        )
    hf_state_dict = {name: t.detach().cpu().contiguous() for name, t in to_hf(state_dict, args).items()}
    dtype = next(iter(hf_state_dict.values())).dtype if hf_state_dict else None
    (folder / _CONFIG_FILE).write_text(json.dumps(hf_config_from_args(args, dtype), indent=2) + "\n")
    save_file(hf_state_dict, str(folder / _WEIGHTS_FILE), metadata={"format": "pt"})
