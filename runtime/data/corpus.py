"""Document sources, always enumerated in a deterministic order.

Determinism matters because the loader's position is an index into the packed token
stream: the same config must rebuild the same stream on every rank and after a restart.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from stalwart.errors import MissingInputError

__all__ = [
    "SOURCES",
    "TEXT_SUFFIXES",
    "stdlib_sources",
    "corpus_files",
    "read_documents",
    "documents_from_files",
    "iter_documents",
]

SOURCES: tuple[str, ...] = ("stdlib", "files")

# Suffixes picked up when walking a folder. A file passed directly is read whatever its suffix.
TEXT_SUFFIXES: frozenset[str] = frozenset(
    {
        ".txt",
        ".md",
        ".rst",
        ".py",
        ".pyi",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".rs",
        ".go",
        ".java",
        ".js",
        ".ts",
        ".sh",
        ".html",
        ".css",
        ".tex",
        ".toml",
        ".yaml",
        ".yml",
        ".cfg",
        ".ini",
        ".csv",
        ".jsonl",
    }
)
_SKIP_DIRS: frozenset[str] = frozenset({"site-packages", "dist-packages", "__pycache__"})


def _walk_sorted(root: Path, keep_suffixes: frozenset[str]) -> list[Path]:
    """Files under root with a wanted suffix, sorted by relative POSIX path (platform-independent)."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            if full.suffix.lower() in keep_suffixes:
                found.append((full.relative_to(root).as_posix(), full))
    found.sort(key=lambda item: item[0])
    return [full for _, full in found]


def stdlib_sources() -> list[Path]:
    """This interpreter's standard-library .py files: a zero-download corpus on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _walk_sorted(root, frozenset({".py"}))
    if not files:
        raise MissingInputError(
            f"no standard-library .py files under '{root}' (stripped Python install?); "
            'use source = "files" with a path to .txt/.jsonl data instead'
        )
    return files


def corpus_files(source: str, path: str | Path | None = None) -> list[Path]:
    """The ordered file list behind a source; also what the token cache key hashes."""
    if source == "stdlib":
        return stdlib_sources()
    if source != "files":
        raise ValueError(f'unknown data source {source!r}; use source = "stdlib" or source = "files" (with a path)')
    if path is None:
        raise ValueError(
            'data source "files" needs a path; pass a file or folder of .txt/.jsonl, or use source = "stdlib"'
        )
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise MissingInputError(
            f"data path '{path}' does not exist; pass a file or folder of .txt/.jsonl, or use source = \"stdlib\""
        )
    files = _walk_sorted(p, TEXT_SUFFIXES)
    if not files:
        raise MissingInputError(
            f"data folder '{path}' has no text files (looked for {', '.join(sorted(TEXT_SUFFIXES))}); "
            'add some, point the path at a file, or use source = "stdlib"'
        )
    return files


def _jsonl_documents(file: Path, field: str) -> Iterator[str]:
    with file.open("r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{file}:{lineno}: invalid JSON ({e.msg}); each line of a .jsonl must be one JSON object"
                ) from e
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{file}:{lineno}: no {field!r} field (found {keys}); set jsonl_field to the key holding the text"
                )
            text = record[field]
            if not isinstance(text, str):
                raise ValueError(f"{file}:{lineno}: field {field!r} is {type(text).__name__}, expected a string")
            yield text


def read_documents(file: Path, jsonl_field: str = "text") -> Iterator[str]:
    """.jsonl → one document per line (from `jsonl_field`); anything else → the whole file."""
    if file.suffix.lower() == ".jsonl":
        yield from _jsonl_documents(file, jsonl_field)
    else:
        yield file.read_text(encoding="utf-8", errors="replace")


def documents_from_files(files: list[Path], jsonl_field: str = "text") -> Iterator[str]:
    """Non-empty documents of already-resolved files, in the files' order."""
    for file in files:
        for doc in read_documents(file, jsonl_field):
            if doc:
                yield doc


def iter_documents(source: str, path: str | Path | None = None, jsonl_field: str = "text") -> Iterator[str]:
    """All non-empty documents of a source, in deterministic order.

    Not a generator itself, so a bad source/path raises here rather than at first `next()`.
    """
    return documents_from_files(corpus_files(source, path), jsonl_field)
