"""The environment a launcher hands the processes of its node: one place for every variable's name.

``stalwart launch`` (and the demo) export these for the ranks, healthd and the controller;
the ranks read them back. Standard library only.
"""

from __future__ import annotations

import os

LAUNCHER_ENV = "STALWART_LAUNCHER"  # set: this rank runs under `stalwart launch` (hot spares, exit codes)
NODE_ID_ENV = "STALWART_NODE_ID"  # the node's name (--node-id)
HEALTHD_ENV = "STALWART_HEALTHD"  # the node's healthd address
CONTROLLER_ENV = "STALWART_CONTROLLER"  # the job controller's gRPC address
TOKEN_FILE_ENV = "STALWART_TOKEN_FILE"  # the job token that mutating RPCs present
# The job's store, which outlives every rank: tcp://HOST:PORT/PREFIX or etcd://HOST:PORT[,...]/PREFIX
# (stalwart.parallel.job_store.job_store() opens it).
JOB_STORE_ENV = "STALWART_JOB_STORE"
REPLACEMENT_ENV = "STALWART_REPLACEMENT"  # set on a rank started to replace a lost one: the generation it replaces
WARM_SPARE_ENV = "STALWART_WARM_SPARE"  # set on a node's warm spare: it imports the trainer, then waits on stdin
JOB_ID_ENV = "STALWART_JOB_ID"  # one job's identity across its nodes and restarts (the run lease's holder)
PARENT_PID_ENV = "STALWART_PARENT_PID"  # the stalwart process that started this one (see lifeline.py)


def node_name() -> str:
    """This process's node name as the launcher set it (falls back to torch elastic's node rank, then 0)."""
    return os.environ.get(NODE_ID_ENV) or os.environ.get("GROUP_RANK", "0")
