"""Names of step directories under a checkpoint root, and which of them a reader may trust.

A step is saved into a fresh ``step-00000042.tmp-<id>`` directory (DCP overwrites shards in place,
so a directory is never reused). It becomes visible only once it holds the ``COMMITTED`` marker,
written last. On local disk the directory is then renamed to ``step-00000042``; on S3, where a
rename is copy + delete, it keeps its temporary name. A crash between marker and rename leaves a
committed ``.tmp-`` directory, which readers accept: the marker, not the name, is the commit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

COMMIT_MARKER = "COMMITTED"
CHECKPOINTS_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8,})(?:\.tmp-([0-9a-f]+))?$")


@dataclass(frozen=True)
class StepDir:
    step: int
    name: str

    @property
    def is_tmp(self) -> bool:
        return ".tmp-" in self.name


def final_name(step: int) -> str:
    return f"step-{step:08d}"


def tmp_name(step: int, token: str) -> str:
    return f"{final_name(step)}.tmp-{token}"


def parse(name: str) -> StepDir | None:
    """The step of a directory name, or None for anything that is not a step directory."""
    match = _NAME.match(name)
    return StepDir(int(match.group(1)), name) if match else None


def default_checkpoint_url(run_dir: str | Path, url: str = "") -> str:
    """Where a job's checkpoints live: ``checkpoint.url`` when set, else ``RUN/checkpoints``."""
    return url or str(Path(run_dir) / CHECKPOINTS_DIR)
