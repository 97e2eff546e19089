"""Shared test set-up: the helper modules beside this file are importable, and the fixtures every kind uses.

Tests are organised by kind: ``unit/`` (one process, seconds), ``distributed/`` (several ranks joined in
a gloo group, ``dist_harness.run_ranks``) and ``system/`` (real ``stalwart`` processes: launchers,
daemons, the controller, a browser). ``pytest tests/unit`` is the quick loop.
"""

import sys
from pathlib import Path

import pytest

# The tests folder is not a package (the repository root is); make its helpers importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import chromium  # noqa: E402,F401  (a session fixture)
from controller_helpers import TOKEN  # noqa: E402

from stalwart.jobenv import TOKEN_FILE_ENV  # noqa: E402


@pytest.fixture
def token_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The job token file (mode 0600), exported as $STALWART_TOKEN_FILE for the processes a test starts."""
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    monkeypatch.setenv(TOKEN_FILE_ENV, str(path))  # the rank processes and clients read it from here
    return path
