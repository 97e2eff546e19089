"""The run lease on local disk and on S3 (moto): one live job at a time, takeovers with a higher epoch, fencing."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from s3_server import LocalS3

from stalwart.checkpoint import naming
from stalwart.checkpoint.catalog import CheckpointCatalog
from stalwart.checkpoint.lease import LeaseHeld, LeaseLost, RunLease, current_record, record_name
from stalwart.checkpoint.manager import CheckpointManager
from stalwart.checkpoint.storage import Storage


@pytest.fixture(scope="module")
def s3():
    server = LocalS3()
    server.start()
    server.make_bucket("lease")
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """(url, storage options) of an empty checkpoint root."""
    if request.param == "local":
        return str(tmp_path / "ckpt"), None
    s3 = request.getfixturevalue("s3")
    return f"s3://lease/{tmp_path.name}", s3.storage_options()


def test_a_second_job_is_refused_naming_the_holder_and_the_same_job_takes_the_next_epoch(root):
    url, options = root
    storage = Storage(url, options)
    first = RunLease(storage, job="job-a")
    assert first.acquire(inherited=list).epoch == 1
    with pytest.raises(LeaseHeld) as refused:
        RunLease(Storage(url, options), job="job-b").acquire(inherited=list)
    message = str(refused.value)
    assert "job 'job-a'" in message and f"pid {first.record.pid}" in message and "\n" not in message
    again = RunLease(Storage(url, options), job="job-a")  # the same job restarted (a world restart)
    assert again.acquire(inherited=list).epoch == 2
    with pytest.raises(LeaseLost):
        first.check()


def test_a_gone_holder_is_taken_over_at_once_here_and_after_its_ttl_elsewhere(root):
    url, options = root
    storage = Storage(url, options)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = RunLease(storage, job="job-a")
    holder.acquire(inherited=list)
    holder.record.pid = int(dead.stdout)  # its process (on this host) has exited
    storage.write_bytes(record_name(1), holder.record.to_json())
    assert RunLease(storage, job="job-b").acquire(inherited=list).epoch == 2

    far = current_record(storage)
    far.host, far.ttl_s = "another-host", 0.3  # can't look at its pid: only the ttl tells
    storage.write_bytes(record_name(2), far.to_json())
    with pytest.raises(LeaseHeld):
        RunLease(storage, job="job-c").acquire(inherited=list)
    time.sleep(0.5)
    assert RunLease(storage, job="job-c").acquire(inherited=list).epoch == 3


def test_two_jobs_racing_for_one_epoch_get_one_winner(root, monkeypatch):
    url, options = root
    storage = Storage(url, options)
    winner = RunLease(storage, job="job-a")
    winner.acquire(inherited=list)
    import stalwart.checkpoint.lease as lease_module

    real, reads = lease_module.current_record, []

    def first_read_before_the_winner(storage: Storage):
        reads.append(1)
        return None if len(reads) == 1 else real(storage)

    monkeypatch.setattr(lease_module, "current_record", first_read_before_the_winner)
    with pytest.raises(LeaseHeld):
        RunLease(storage, job="job-b").acquire(inherited=list)  # its exclusive create of epoch 1 failed
    assert len(reads) == 2 and real(storage).job == "job-a" and real(storage).epoch == 1


def test_a_commit_by_an_older_epoch_is_rejected_and_a_late_marker_is_ignored(root):
    url, options = root
    old = CheckpointManager(url, options, lease_ttl_s=0.5, keep_last=5)
    old.save(1, {"w": torch.ones(8)})
    old.lease._stop.set()  # the old job freezes: no more renewals
    time.sleep(0.8)
    storage = Storage(url, options)
    catalog = CheckpointCatalog(storage)
    new = RunLease(storage, job="job-b")
    assert new.acquire(inherited=lambda: catalog.committed_dirs().values()).epoch == 2
    assert new.record.fence == [catalog.step_dir(1)]  # what it inherits

    with pytest.raises(LeaseLost, match="taken over by job 'job-b'"):
        old.save(2, {"w": torch.full((8,), 2.0)})  # the frozen job wakes up and tries to commit
    # A late writer that raced past the check: its marker names epoch 1 and is ignored.
    late = naming.tmp_name(3, "1a7e")
    storage.write_bytes(f"{late}/.metadata", b"x")
    storage.write_bytes(f"{late}/{naming.COMMIT_MARKER}", json.dumps({"step": 3, "epoch": 1}).encode())
    assert catalog.committed_steps() == [1]
    catalog.prune(keep_last=5, stale_before=3)  # the leftovers go with a later prune
    assert sorted(storage.list_dir()) == sorted([catalog.step_dir(1), "lease"])
    old.lease = None  # nothing to release: it is not the holder
    old.close()
