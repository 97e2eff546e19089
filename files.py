"""One way to write a file that readers must never see torn (standard library only).

Every writer of state that other processes read (exclusion list, rollback orders, healthd status,
checkpoint markers and manifests on local disk, host-memory copies, the token cache) goes through
:func:`atomic_write`: the data goes to a temporary name in the same directory and is renamed into
place, so a reader sees the old file or the new one. ``durable`` adds the fsyncs (file, then
directory) that make the new file survive a crash or power loss; tmpfs copies skip them.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

Payload = bytes | str | Callable[[BinaryIO], None]


def atomic_write(path: str | os.PathLike, data: Payload, *, durable: bool = True, exclusive: bool = False) -> None:
    """Write ``data`` (bytes, text, or a function that writes into the open file) to ``path`` atomically.

    ``exclusive`` raises ``FileExistsError`` when ``path`` exists and never replaces it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, target)  # FileExistsError, never a replacement
        else:
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(target.parent)


def atomic_write_json(path: str | os.PathLike, obj: object, *, durable: bool = True) -> None:
    """:func:`atomic_write` of ``obj`` as indented JSON."""
    atomic_write(path, json.dumps(obj, indent=1), durable=durable)


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a directory entry (a rename or a new file) across a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
