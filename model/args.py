"""Model hyper-parameters and the published Llama 3 flavors.

`ModelArgs` is frozen so that one instance can be shared by the model, the FLOP
counter, the checkpoint adapter and the parallelism plans without anyone mutating
it behind the others' backs; derive variants with `dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 rotary frequency scaling (Hugging Face `rope_type: "llama3"`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"RopeScaling needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor} <= {self.low_freq_factor}; Llama 3.1 uses low=1.0, high=4.0"
            )
        if self.factor <= 0 or self.original_max_position_embeddings <= 0:
            raise ValueError(
                "RopeScaling needs factor > 0 and original_max_position_embeddings > 0, got "
                f"factor={self.factor}, original_max_position_embeddings={self.original_max_position_embeddings}"
            )


@dataclass(frozen=True)
class ModelArgs:
    """Shape of a Llama 3 decoder, parameterised the way Meta's reference code is.

    `ffn_hidden_dim_override` exists only for imported checkpoints whose
    `intermediate_size` cannot be reproduced by `multiple_of`/`ffn_dim_multiplier`.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    ffn_hidden_dim_override: int | None = None

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) "
                "for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings; change dim or n_heads")
        if self.ffn_hidden_dim_override is not None and self.ffn_hidden_dim_override <= 0:
            raise ValueError(f"ffn_hidden_dim_override must be positive, got {self.ffn_hidden_dim_override}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width by Meta's formula: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
        if self.ffn_hidden_dim_override is not None:
            return self.ffn_hidden_dim_override
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


def hf_shape(args: ModelArgs) -> dict[str, int | bool]:
    """The Hugging Face config.json keys that fix every tensor's shape (what a checkpoint must match)."""
    return {
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": args.tie_embeddings,
    }


_LLAMA_3_1_SCALING = RopeScaling(factor=8.0)
_LLAMA_3_2_SCALING = RopeScaling(factor=32.0)
_LLAMA_3_VOCAB = 128256
_LLAMA_3_1_CONTEXT = 131072

FLAVORS: dict[str, ModelArgs] = {
    # Tiny model for tests and smoke runs; vocab 264 covers the 258-id byte tokenizer
    # and stays divisible by 8 so vocab-sharded tensor parallelism splits evenly.
    "debug": ModelArgs(
        dim=128,
        n_layers=4,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=264,
        multiple_of=64,
        rope_scaling=_LLAMA_3_1_SCALING,
        max_seq_len=2048,
    ),
    # Llama 3.2 (tied embeddings, rope factor 32).
    "1B": ModelArgs(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=_LLAMA_3_VOCAB,
        multiple_of=256,
        ffn_dim_multiplier=1.5,
        rope_scaling=_LLAMA_3_2_SCALING,
        max_seq_len=_LLAMA_3_1_CONTEXT,
        tie_embeddings=True,
    ),
    "3B": ModelArgs(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        vocab_size=_LLAMA_3_VOCAB,
        multiple_of=256,
        ffn_dim_multiplier=1.0,
        rope_scaling=_LLAMA_3_2_SCALING,
        max_seq_len=_LLAMA_3_1_CONTEXT,
        tie_embeddings=True,
    ),
    # Llama 3.1 (untied embeddings, rope factor 8).
    "8B": ModelArgs(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=_LLAMA_3_VOCAB,
        multiple_of=1024,
        ffn_dim_multiplier=1.3,
        rope_scaling=_LLAMA_3_1_SCALING,
        max_seq_len=_LLAMA_3_1_CONTEXT,
    ),
    "70B": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=_LLAMA_3_VOCAB,
        multiple_of=4096,
        ffn_dim_multiplier=1.3,
        rope_scaling=_LLAMA_3_1_SCALING,
        max_seq_len=_LLAMA_3_1_CONTEXT,
    ),
    "405B": ModelArgs(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        vocab_size=_LLAMA_3_VOCAB,
        multiple_of=4096,
        ffn_dim_multiplier=1.2,
        rope_scaling=_LLAMA_3_1_SCALING,
        max_seq_len=_LLAMA_3_1_CONTEXT,
    ),
}


def get_flavor(name: str) -> ModelArgs:
    """Look up a published flavor by name, failing with the list of valid names."""
    try:
        return FLAVORS[name]
    except KeyError:
        raise ValueError(f"unknown model flavor {name!r}; valid flavors: {', '.join(FLAVORS)}") from None
