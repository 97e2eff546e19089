"""Crash-safe retention: a kill planted before every operation of a prune never leaves a committed step with holes.

A checkpoint root holds four committed steps and a stale uncommitted save. For every k, a real
process runs the prune that keeps the newest two and SIGKILLs itself just before its k-th
mutating file-system operation (local: every unlink, rmdir, rename, link; S3: every mutating
request); then ``stalwart ckpt verify`` must find every step still committed intact, the kept
steps must be there, and a later prune (the cleanup) must leave nothing but the kept steps. The
last k is the one at which the prune finishes without being killed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from s3_server import LocalS3

from stalwart.checkpoint import naming
from stalwart.checkpoint.catalog import CheckpointCatalog
from stalwart.checkpoint.manager import CheckpointManager
from stalwart.cli.main import main as stalwart_main

ROOT = Path(__file__).resolve().parents[2]
KEEP_LAST = 2
STEPS = (1, 2, 3, 4)

# Runs the prune with a kill planted before the N-th mutating operation (argv: url, N, endpoint or "").
PRUNE_WITH_A_PLANTED_KILL = r"""
import os, signal, sys

url, kill_at, endpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3]
done = 0

def before_mutation():
    global done
    done += 1
    if done == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def planted(fn):
    def wrapper(*args, **kwargs):
        before_mutation()
        return fn(*args, **kwargs)
    return wrapper

for name in ("unlink", "remove", "rmdir", "rename", "replace", "link"):
    setattr(os, name, planted(getattr(os, name)))

import s3fs

call_s3 = s3fs.S3FileSystem._call_s3
MUTATING = {"delete_object", "delete_objects", "put_object", "copy_object", "complete_multipart_upload"}

async def counted_call_s3(self, method, *args, **kwargs):
    if method in MUTATING:
        before_mutation()
    return await call_s3(self, method, *args, **kwargs)

s3fs.S3FileSystem._call_s3 = counted_call_s3

from stalwart.checkpoint.catalog import CheckpointCatalog

options = {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True} if endpoint else None
print("pruned", CheckpointCatalog.open(url, options).prune(keep_last=int(sys.argv[4])), flush=True)
"""


def make_checkpoints(url: str, options: dict | None) -> None:
    manager = CheckpointManager(url, options, keep_last=len(STEPS))
    for step in STEPS:
        manager.save(step, {"w": torch.full((4096,), float(step)), "step": step})
    manager.close()
    stale = naming.tmp_name(2, "deadbeef")  # a save that crashed before its marker
    manager.storage.write_bytes(f"{stale}/__0_0.distcp", b"partial shard")


def prune(url: str, kill_at: int, endpoint: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PRUNE_WITH_A_PLANTED_KILL, url, str(kill_at), endpoint, str(KEEP_LAST)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def verify(url: str, endpoint: str) -> int:
    """``stalwart ckpt verify URL`` (every committed step), run in this process: its exit code."""
    return stalwart_main(["ckpt", "verify", url, *(["--s3-endpoint", endpoint] if endpoint else [])])


def check_every_kill_point(fresh_copy, endpoint: str, options: dict | None) -> int:
    """Run the prune killed at every point; returns how many points there were."""
    kill_at = 1
    while True:
        url = fresh_copy(kill_at)
        done = prune(url, kill_at, endpoint)
        finished = done.returncode == 0
        assert finished or done.returncode == -9, done.stderr[-2000:]
        assert verify(url, endpoint) == 0, f"kill before operation {kill_at} left a damaged committed step (see above)"
        catalog = CheckpointCatalog.open(url, options)
        committed = catalog.committed_steps()
        assert set(STEPS[-KEEP_LAST:]) <= set(committed), (kill_at, committed)
        catalog.prune(keep_last=KEEP_LAST)  # the next prune (after a later save) removes the leftovers
        left = catalog.storage.list_dir()
        assert catalog.committed_steps() == list(STEPS[-KEEP_LAST:]), (kill_at, left)
        assert left == sorted(catalog.committed_dirs().values()), (kill_at, left)  # no leftover
        if finished:
            return kill_at
        kill_at += 1


@pytest.mark.slow
def test_a_kill_anywhere_in_a_local_prune_leaves_only_intact_committed_steps(tmp_path: Path) -> None:
    template = tmp_path / "template"
    make_checkpoints(str(template), None)

    def fresh_copy(k: int) -> str:
        target = tmp_path / f"kill-{k}"
        shutil.copytree(template, target)
        return str(target)

    points = check_every_kill_point(fresh_copy, "", None)
    assert points > 2 * 4  # two doomed steps of four files each, and the stale save: every one was a kill point


@pytest.mark.slow
def test_a_kill_anywhere_in_an_s3_prune_leaves_only_intact_committed_steps() -> None:
    import s3fs

    server = LocalS3()
    server.start()
    try:
        server.make_bucket("ckpt")
        options = server.storage_options()
        make_checkpoints("s3://ckpt/template", options)
        fs = s3fs.S3FileSystem(**options)

        def fresh_copy(k: int) -> str:
            fs.invalidate_cache()
            for key in fs.find("ckpt/template"):
                fs.copy(key, key.replace("ckpt/template/", f"ckpt/kill-{k}/", 1))
            return f"s3://ckpt/kill-{k}"

        points = check_every_kill_point(fresh_copy, server.endpoint, options)
        assert points > 3  # a marker and a bulk delete per doomed step, and the stale save
    finally:
        server.stop()
