"""Real storage faults for tests: a small tmpfs that can be filled or remounted read-only.

Mounting needs root (CI runs as root); where the kernel refuses, the test is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@contextmanager
def small_tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    """A ``size_mb`` MiB tmpfs mounted at ``path`` for the body; skips the test when mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = _mount("-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path))
    except FileNotFoundError:
        pytest.skip("no mount(8) on this machine: the storage-fault tests need a real tmpfs")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path} ({done.stderr.strip() or done.returncode}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def remount(path: Path, mode: str) -> None:
    """``mode`` is "ro" or "rw": a read-only file system refuses every write, root's included."""
    done = _mount("-o", f"remount,{mode}", str(path))
    assert done.returncode == 0, f"remount,{mode} {path}: {done.stderr}"


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` read-only for the body: a read-only bind mount of it over itself (files open for writing
    elsewhere on its file system, like an event log beside it, do not keep it from going read-only)."""
    done = _mount("--bind", str(path), str(path))
    assert done.returncode == 0, f"bind mount {path}: {done.stderr}"
    try:
        remount_ro = _mount("-o", "remount,bind,ro", str(path))
        assert remount_ro.returncode == 0, f"remount,bind,ro {path}: {remount_ro.stderr}"
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, timeout=30)


def fill(path: Path, leave_bytes: int) -> Path:
    """Fill the file system of ``path`` until ``leave_bytes`` are free; returns the filler (delete it to free)."""
    filler = path / "filler.bin"
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as f:
        left = max(0, free - leave_bytes)
        chunk = b"\0" * (1 << 20)
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    return filler
