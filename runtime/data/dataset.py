"""Token stream construction (with an optional shared on-disk cache) and fixed-length packing.

The stream is `[BOS] doc0 [EOS] [BOS] doc1 [EOS] ...` held in one numpy array, built once.
Sample i is `stream[i*seq_len : i*seq_len + seq_len + 1]`, so consecutive samples share one
boundary token and every token is predicted exactly once per epoch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from stalwart.files import atomic_write
from stalwart.runtime.data.corpus import corpus_files, documents_from_files
from stalwart.runtime.data.tokenizer import Tokenizer, encode_documents

__all__ = ["token_dtype", "pack_documents", "TokenStream", "PackedDataset"]

# Bump when the stream layout changes so stale caches are never reused.
_CACHE_FORMAT = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype holding every id: halves memory (and cache size) for vocabularies <= 65536."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def pack_documents(docs: Iterable[str], tokenizer: Tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """Concatenate `[BOS] + ids + [EOS]` per document into one array, stopping at `max_tokens`."""
    pieces: list[np.ndarray] = []
    total = 0
    for ids in encode_documents(tokenizer, docs):
        if ids.dtype != np.uint8 and ids.size and (int(ids.max()) >= tokenizer.vocab_size or int(ids.min()) < 0):
            raise ValueError(
                f"{tokenizer!r} produced ids outside [0, vocab_size={tokenizer.vocab_size}); "
                "fix the tokenizer's vocab_size"
            )
        pieces.append(ids)
        total += ids.size + 2
        if max_tokens is not None and total >= max_tokens:
            break
    out = np.empty(total, dtype=token_dtype(tokenizer.vocab_size))
    pos = 0
    for ids in pieces:
        n = ids.size
        out[pos] = tokenizer.bos_id
        out[pos + 1 : pos + 1 + n] = ids
        out[pos + 1 + n] = tokenizer.eos_id
        pos += n + 2
    return out if max_tokens is None else out[:max_tokens]


def _cache_key(
    source: str,
    path: str | Path | None,
    files: list[Path],
    tokenizer: Tokenizer,
    jsonl_field: str,
    max_tokens: int | None,
) -> str:
    """Hash of everything that determines the stream; any edit to a file (size/mtime) invalidates it."""
    identity = getattr(tokenizer, "identity", None)
    if not isinstance(identity, str):
        raise ValueError(
            f"{tokenizer!r} has no string `identity`, so its token cache cannot be keyed; "
            "give it one (a string that changes whenever its ids would) or pass cache_dir=None"
        )
    h = hashlib.sha256()
    header = {
        "format": _CACHE_FORMAT,
        "source": source,
        "path": None if path is None else str(Path(path).expanduser().resolve()),
        "jsonl_field": jsonl_field,
        "max_tokens": max_tokens,
        "tokenizer": identity,
        "bos": tokenizer.bos_id,
        "eos": tokenizer.eos_id,
        "dtype": token_dtype(tokenizer.vocab_size).str,
    }
    h.update(json.dumps(header, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"\n{f}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _atomic_save(target: Path, tokens: np.ndarray) -> None:
    """temp file + fsync + os.replace: readers only ever see a complete .npy."""
    atomic_write(target, lambda f: np.save(f, np.ascontiguousarray(tokens)))


def _load_or_build(target: Path, build: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
    """Load `target` or build and save it; one builder at a time across processes on this filesystem.

    flock (not an O_EXCL marker file) because the kernel drops it if the builder is killed,
    so a crashed rank never leaves the restarted job waiting on a stale lock.
    Loads are memory-mapped so ranks on one node share the page cache instead of N copies.
    """
    if target.exists():
        return np.load(target, mmap_mode="r"), True
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if target.exists():  # another rank built it while we waited
                return np.load(target, mmap_mode="r"), True
            tokens = build()
            _atomic_save(target, tokens)
            return tokens, False
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class TokenStream:
    """The packed token array of a corpus, plus where it came from (for logs and tests)."""

    tokens: np.ndarray
    cache_path: Path | None = None
    from_cache: bool = False

    @classmethod
    def build(
        cls,
        source: str,
        path: str | Path | None,
        tokenizer: Tokenizer,
        *,
        jsonl_field: str = "text",
        max_tokens: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> TokenStream:
        """Tokenize `source` once; with `cache_dir`, reuse a matching .npy built by any earlier process."""
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1 (or None for the whole corpus)")
        files = corpus_files(source, path)

        def build_now() -> np.ndarray:
            return pack_documents(documents_from_files(files, jsonl_field), tokenizer, max_tokens)

        if cache_dir is None:
            return cls(build_now())
        key = _cache_key(source, path, files, tokenizer, jsonl_field, max_tokens)
        target = Path(cache_dir).expanduser() / f"tokens-{source}-{key}.npy"
        tokens, hit = _load_or_build(target, build_now)
        return cls(tokens, cache_path=target, from_cache=hit)

    def __len__(self) -> int:
        return int(self.tokens.size)


class PackedDataset(Dataset[tuple[Tensor, Tensor]]):
    """Fixed-length next-token samples over a token stream; the incomplete tail is dropped."""

    def __init__(self, tokens: np.ndarray | TokenStream, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        self.tokens: np.ndarray = tokens.tokens if isinstance(tokens, TokenStream) else np.asarray(tokens)
        self.seq_len = seq_len
        self._len = max(0, (self.tokens.size - 1) // seq_len)
        if self._len == 0:
            raise ValueError(
                f"the corpus has {self.tokens.size} tokens, fewer than seq_len+1={seq_len + 1} needed for one "
                "sample; use a larger corpus (or max_tokens) or a smaller seq_len"
            )

    @classmethod
    def from_source(
        cls,
        source: str,
        path: str | Path | None,
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        jsonl_field: str = "text",
        max_tokens: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> PackedDataset:
        """One call from config to dataset (see `TokenStream.build`)."""
        stream = TokenStream.build(
            source, path, tokenizer, jsonl_field=jsonl_field, max_tokens=max_tokens, cache_dir=cache_dir
        )
        return cls(stream, seq_len)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

    def __len__(self) -> int:
        return self._len

    def sample(self, i: int) -> np.ndarray:
        """The seq_len+1 raw tokens of sample i (inputs and labels overlap by all but one)."""
        if not 0 <= i < self._len:
            raise IndexError(f"sample index {i} out of range for {self._len} samples")
        start = i * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        chunk = torch.from_numpy(self.sample(int(i)).astype(np.int64))
        return chunk[:-1], chunk[1:]
