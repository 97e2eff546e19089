"""One checkpoint root on any fsspec backend: local disk, ``file://`` or ``s3://bucket/prefix``.

Paths given to :class:`Storage` are relative to the root and always use ``/``. The class hides the
two backend differences the checkpoint protocol depends on:

- create-if-absent writes (the commit marker): ``O_EXCL`` locally, ``If-None-Match: *`` on S3
  (s3fs mode ``"xb"``); both raise ``FileExistsError`` when the object is already there;
- listing caches: s3fs caches directory listings and does not see other writers' objects until
  :meth:`Storage.invalidate_cache`, so every read of the tree starts from a fresh listing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from stalwart.files import atomic_write, fsync_dir


def s3_storage_options(endpoint: str = "", max_attempts: int = 0) -> dict[str, Any] | None:
    """fsspec options for an S3 root: a custom endpoint (S3-compatible stores) and botocore's attempt budget.

    botocore retries a refused connection with exponential back-off; with its default budget a
    write during a store outage takes tens of seconds to fail, and the next save waits for it.
    ``max_attempts`` 0 keeps botocore's default.
    """
    options: dict[str, Any] = {}
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    if max_attempts > 0:
        options["config_kwargs"] = {"retries": {"max_attempts": max_attempts, "mode": "standard"}}
    return options or None


def url_problem(url: str) -> str | None:
    """What is wrong with a checkpoint root URL before anything opens it (scheme, bucket); None when usable."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None  # a local path
    if scheme in ("s3", "s3a") and not rest.split("/", 1)[0]:
        return f"{url!r} names no bucket; write s3://BUCKET/PREFIX"
    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        return f"{url!r}: no storage is known for {scheme}://; use a path, file:// or s3://BUCKET/PREFIX"
    except ImportError as e:
        return f"{url!r}: {scheme}:// needs a package that is not installed ({e}); use a path or s3://BUCKET/PREFIX"
    return None


class Storage:
    """Bytes in, bytes out, under ``base_url``; ``storage_options`` go to ``fsspec.url_to_fs``."""

    def __init__(self, base_url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        self.base_url = os.fspath(base_url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs: fsspec.AbstractFileSystem
        self.fs, self.root = url_to_fs(self.base_url, **self.storage_options)
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)
        if self.is_local:
            self.root = os.path.abspath(self.root)
            os.makedirs(self.root, exist_ok=True)
        self.scheme = (
            "local"
            if self.is_local
            else (self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0])
        )

    def path(self, rel: str = "") -> str:
        """Backend path of ``rel`` (what ``self.fs`` takes)."""
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str = "") -> str:
        """Full URL of ``rel`` (what DCP's fsspec writer/reader take); a plain path locally."""
        if self.is_local:
            return self.path(rel)
        return self.fs.unstrip_protocol(self.path(rel))

    def invalidate_cache(self) -> None:
        self.fs.invalidate_cache()

    def write_bytes(self, rel: str, data: bytes, *, exclusive: bool = False) -> None:
        """Write a whole small object; ``exclusive`` raises ``FileExistsError`` if it exists.

        Locally the object is written to a temporary name, fsynced and renamed into place (or
        hard-linked for ``exclusive``), so readers never see a torn file. An S3 PUT is atomic by
        itself.
        """
        target = self.path(rel)
        if self.is_local:
            atomic_write(target, data, exclusive=exclusive)
        else:
            with self.fs.open(target, "xb" if exclusive else "wb") as f:
                f.write(data)
        self.invalidate_cache()

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    @contextmanager
    def open_read(self, rel: str) -> Iterator[IO[bytes]]:
        with self.fs.open(self.path(rel), "rb") as f:
            yield f

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def list_dir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the direct children of ``rel``; empty if it does not exist."""
        self.invalidate_cache()
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def walk_files(self, rel: str) -> dict[str, int]:
        """Every file under ``rel`` as {path relative to ``rel``: size in bytes}."""
        self.invalidate_cache()
        base = self.path(rel)
        found = self.fs.find(base, detail=True)
        return {p[len(base) + 1 :]: int(info["size"]) for p, info in found.items() if info.get("type") != "directory"}

    def delete_file(self, rel: str) -> None:
        """Remove one file; ``FileNotFoundError`` when it is not there. Durable locally (the directory is fsynced).

        The removal of a commit marker must reach the disk before the files it covered go.
        """
        self.fs.rm_file(self.path(rel))
        if self.is_local:
            fsync_dir(os.path.dirname(self.path(rel)))
        self.invalidate_cache()

    def delete_tree(self, rel: str) -> None:
        """Remove ``rel`` and everything under it; a missing tree is not an error."""
        try:
            self.fs.rm(self.path(rel), recursive=True)
        except FileNotFoundError:
            pass
        self.invalidate_cache()

    def local_condition(self) -> str:
        """Why local writes may fail, in words ("read-only", "3.0 MiB free of 48 MiB"); "" for remote storage.

        Torch's shard writer can report a full disk as a bare ``enforce fail ... unexpected pos``: this
        says what the file system itself shows.
        """
        if not self.is_local:
            return ""
        try:
            st = os.statvfs(self.root)
        except OSError as e:
            return f"its file system cannot be read ({e.strerror or e})"
        if st.f_flag & os.ST_RDONLY:
            return "its file system is mounted read-only"
        if not os.access(self.root, os.W_OK):
            return f"{self.root} is not writable by this user"
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        return f"{free / 2**20:.1f} MiB free of {total / 2**20:.0f} MiB on its file system"

    def rename_dir(self, src: str, dst: str) -> None:
        """Atomic directory rename; local disk only (on S3 a rename is copy + delete)."""
        if not self.is_local:
            raise NotImplementedError(f"rename is not atomic on {self.scheme}; commit with a marker object instead")
        os.rename(self.path(src), self.path(dst))
        fsync_dir(self.root)
