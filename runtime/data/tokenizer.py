"""Tokenizers: a built-in byte-level one (no files, no downloads) and a `tokenizers` wrapper.

Both expose the same small surface (`Tokenizer`), plus an optional `encode_batch` that
returns numpy arrays so the dataset builder never loops over tokens in Python.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from stalwart.errors import ConfigError, MissingInputError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "build_tokenizer",
    "encode_documents",
]

# (bos, eos) special-token pairs tried in order when a tokenizer.json does not say which to use.
_KNOWN_SPECIAL_PAIRS: tuple[tuple[str, str], ...] = (
    ("<|begin_of_text|>", "<|end_of_text|>"),  # Llama 3
    ("<s>", "</s>"),  # Llama 2, Mistral, SentencePiece-derived
    ("<bos>", "<eos>"),  # Gemma
    ("<|startoftext|>", "<|endoftext|>"),
)
# EOS-only vocabularies (GPT-2 style) reuse the EOS token as BOS.
_KNOWN_EOS_ONLY: tuple[str, ...] = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    `identity` keys the on-disk token cache: two tokenizers with the same identity must
    produce the same ids for the same text.
    """

    vocab_size: int
    bos_id: int
    eos_id: int
    identity: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, BOS=256, EOS=257: works on any text with zero setup."""

    vocab_size: int = 258
    bos_id: int = 256
    eos_id: int = 257
    identity: str = "byte-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Whole-document byte views; orders of magnitude faster than `encode` per token."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Drops BOS/EOS; invalid UTF-8 (e.g. a sample cut mid-character) becomes U+FFFD."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A `tokenizers` tokenizer.json (Llama, Mistral, GPT-2, ... exports), loaded from disk only.

    BOS/EOS come from `bos_token`/`eos_token` if given, else the first known special pair
    present in the vocabulary. We add BOS/EOS ourselves, so the file's post-processor
    template is bypassed (`add_special_tokens=False`) to avoid doubled specials.
    """

    def __init__(self, path: str | Path, bos_token: str | None = None, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise MissingInputError(
                f"tokenizer file '{self.path}' does not exist; pass a tokenizer.json "
                '(or a folder containing one), or use the built-in tokenizer "byte"'
            )
        self._tok = _RustTokenizer.from_file(str(self.path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        bos, eos = self._resolve_specials(bos_token, eos_token)
        self.bos_token, self.eos_token = bos, eos
        self.bos_id = self._token_id(bos)
        self.eos_id = self._token_id(eos)
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        self.identity = f"hf-{digest}-{bos}-{eos}"

    def _token_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(
                f"special token {token!r} is not in the vocabulary of '{self.path}'; "
                "pass bos_token=/eos_token= naming tokens that exist in this tokenizer.json"
            )
        return int(tid)

    def _resolve_specials(self, bos: str | None, eos: str | None) -> tuple[str, str]:
        if bos is not None and eos is not None:
            return bos, eos
        vocab = self._tok.get_vocab(with_added_tokens=True)
        for cand_bos, cand_eos in _KNOWN_SPECIAL_PAIRS:
            if cand_bos in vocab and cand_eos in vocab:
                return bos or cand_bos, eos or cand_eos
        for cand_eos in _KNOWN_EOS_ONLY:
            if cand_eos in vocab:
                return bos or cand_eos, eos or cand_eos
        tried = ", ".join(f"{b}/{e}" for b, e in _KNOWN_SPECIAL_PAIRS)
        raise ValueError(
            f"tokenizer '{self.path}' has no recognised BOS/EOS tokens (tried {tried}); "
            "add them as special tokens or pass bos_token=/eos_token= explicitly"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Batch encode in Rust (parallel); one numpy array per text."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def build_tokenizer(spec: str) -> Tokenizer:
    """ "byte" → ByteTokenizer; otherwise a tokenizer.json path or a folder that contains one."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise MissingInputError(
            f"tokenizer '{spec}' not found (looked for '{path}'); pass \"byte\" for the built-in "
            "byte-level tokenizer, or a path to a tokenizer.json (or a folder containing one)"
        )
    try:
        return HFTokenizer(path)
    except MissingInputError:
        raise
    except Exception as e:  # the Rust parser raises a bare Exception for a file that is not a tokenizer.json
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(
            f"data.tokenizer '{spec}' is not a usable Hugging Face tokenizer.json ({reason}); pass a tokenizer.json "
            'exported by `tokenizers`/`transformers`, or "byte"'
        ) from None


def encode_documents(tokenizer: Tokenizer, docs: Iterable[str], batch_size: int = 256) -> Iterator[np.ndarray]:
    """Yield one integer array per document (no BOS/EOS), batching when the tokenizer can."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    it = iter(docs)
    if encode_batch is None:
        for doc in it:
            yield np.asarray(tokenizer.encode(doc), dtype=np.int64)
        return
    while chunk := list(islice(it, batch_size)):
        yield from encode_batch(chunk)
