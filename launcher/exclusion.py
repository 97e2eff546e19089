"""The launcher's side of ``RUN_DIR/excluded_nodes.json`` (the file itself: :mod:`stalwart.health.exclusion`).

A node is named by its launcher's ``--node-id`` (default: the host name). An entry matches this node
when its key is the node id, or its recorded ``host`` is (the controller keys entries by healthd's
node and records the host name). An excluded node's launcher exits with :data:`EXIT_NODE_EXCLUDED`,
which the deploy files treat as "do not requeue on this host".
"""

from __future__ import annotations

import os

from stalwart.health.exclusion import ExclusionList

EXIT_NODE_EXCLUDED = 93


def exclude_node(run_dir: str | os.PathLike, node: str, reason: str) -> bool:
    """Put ``node`` (a launcher's node id) on the job's exclusion list; False if it already was.

    Its launcher notices within a monitor interval and leaves with exit code 93; the others re-form.
    """
    return ExclusionList(run_dir).add(node, reason)


class ExclusionWatch:
    """Cheap repeated checks: the file is re-read only when its mtime changes."""

    def __init__(self, run_dir: str | os.PathLike, node_id: str) -> None:
        self.list = ExclusionList(run_dir)
        self.node_id = node_id
        self._mtime: float | None = None
        self._reason: str | None = None

    def reason(self) -> str | None:
        """Why this node is excluded, or None while it is not."""
        try:
            mtime = self.list.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime != self._mtime:
            self._mtime = mtime
            entries = self.list.load()
            hit = entries.get(self.node_id) or next((e for e in entries.values() if e.host == self.node_id), None)
            self._reason = hit.reason if hit else None
        return self._reason
