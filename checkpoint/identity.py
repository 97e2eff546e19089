"""Does a run directory's checkpoint belong to this config? Checked before any rank loads (torch-free).

A different model shape would fail deep inside DCP ("Missing key") or, worse, load a prefix of the
state; a different tokenizer would train on ids that mean other tokens. Both are the same mistake:
the config changed and the run directory did not. The parallel layout may differ: DCP reshards.
"""

from __future__ import annotations

from typing import Any

from stalwart.checkpoint.manifest import CheckpointManifest
from stalwart.errors import UserError


class RunDirectoryMismatch(UserError):
    """The run directory holds checkpoints of another model or tokenizer than the config describes."""


def identity_differences(manifest: CheckpointManifest, model: dict[str, Any], tokenizer: str) -> list[str]:
    """What differs between a checkpoint and the config ("num_hidden_layers 2 in the checkpoint, 4 in the config").

    ``model`` holds the config's shape keys (:func:`stalwart.model.args.hf_shape`); the manifest's
    config.json is compared on those keys only (it holds more, such as the context length).
    """
    differences = [
        f"{key} {manifest.model[key]} in the checkpoint, {value} in the config"
        for key, value in model.items()
        if key in manifest.model and manifest.model[key] != value
    ]
    if manifest.tokenizer and tokenizer and manifest.tokenizer != tokenizer:
        differences.append(f"tokenizer {manifest.tokenizer} in the checkpoint, {tokenizer} in the config")
    return differences


def check_identity(step: int, manifest: CheckpointManifest, model: dict[str, Any], tokenizer: str, where: str) -> None:
    """Raise :class:`RunDirectoryMismatch` (one line: what differs, the fix) when ``manifest`` is another run's."""
    differences = identity_differences(manifest, model, tokenizer)
    if differences:
        raise RunDirectoryMismatch(
            f"{where} holds checkpoints of a different model (step {step}): {'; '.join(differences)}; use a new run "
            "directory (--job.run_dir) or start fresh with --checkpoint.resume none"
        )
