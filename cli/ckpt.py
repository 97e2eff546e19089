"""``stalwart ckpt ls|verify|inspect|export RUN``: look into a job's committed checkpoints.

RUN is a run directory (its checkpoints are under ``RUN/checkpoints``), a directory of ``step-*``
checkpoints, or a checkpoint URL (``s3://bucket/prefix`` with ``--s3-endpoint`` for an
S3-compatible server). Nothing here writes under RUN: these commands only read committed steps.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stalwart.cli.command import Subparsers, actions, subcommand
from stalwart.errors import UserError

if TYPE_CHECKING:
    from stalwart.checkpoint.catalog import CheckpointCatalog


class CkptUsageError(UserError, ValueError):
    """Input the user can fix (no such run or step, output exists); one line, exit 2."""


def register(sub: Subparsers) -> None:
    ckpt = sub.add_parser(
        "ckpt",
        help="list, verify, inspect and export a run's checkpoints",
        description="List, verify, inspect and export the committed checkpoints of a run.",
    )
    csub = actions(ckpt, "ckpt_command")

    def action(name: str, help_: str) -> argparse.ArgumentParser:
        p = subcommand(csub, name, run=run, help=help_)
        p.add_argument(
            "run", metavar="RUN", help="run directory, directory of step-* checkpoints, or URL (s3://bucket/prefix)"
        )
        p.add_argument(
            "--s3-endpoint", metavar="URL", help="endpoint of an S3-compatible store (e.g. http://127.0.0.1:9000)"
        )
        return p

    action("ls", "committed steps with verified flag, size, time and layout")
    verify = action("verify", "check every file of a step (default: all steps) against its manifest checksums")
    verify.add_argument("step", nargs="?", type=int, metavar="STEP")
    inspect = action("inspect", "layout, world size, config hash and every tensor's name, shape and dtype of a step")
    inspect.add_argument("step", type=int, metavar="STEP")
    export = action("export", "write a step as one torch.save file of full tensors, or as Hugging Face safetensors")
    export.add_argument("step", type=int, metavar="STEP")
    export.add_argument(
        "--format",
        choices=("torch", "hf"),
        default="torch",
        help="torch: the whole state, unsharded; hf: the model as config.json + model.safetensors",
    )
    export.add_argument("--out", required=True, metavar="PATH", help="file (torch) or new folder (hf) to write")


def open_checkpoints(run: str, s3_endpoint: str | None = None) -> CheckpointCatalog:
    """The checkpoint catalog of RUN (read-only); a missing run is a :class:`CkptUsageError`."""
    from stalwart.checkpoint.catalog import CheckpointCatalog
    from stalwart.checkpoint.naming import default_checkpoint_url
    from stalwart.checkpoint.storage import s3_storage_options

    if "://" in run and not run.startswith("file://"):
        catalog = CheckpointCatalog.open(run, s3_storage_options(s3_endpoint or ""))
    else:
        path = Path(run.removeprefix("file://"))
        in_run = Path(default_checkpoint_url(path))
        root = in_run if in_run.is_dir() else path
        if not root.is_dir():
            raise CkptUsageError(
                f"{run} does not exist: give a run directory (holding checkpoints/), a checkpoint directory or a URL"
            )
        catalog = CheckpointCatalog.open(str(root))
    if not catalog.committed_steps():
        raise CkptUsageError(
            f"no committed checkpoints under {catalog.base_url}: is RUN the job's run directory or checkpoint.url?"
        )
    return catalog


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from stalwart.checkpoint.catalog import CheckpointError

    catalog = open_checkpoints(args.run, args.s3_endpoint)
    try:
        return {"ls": _ls, "verify": _verify, "inspect": _inspect, "export": _export}[args.ckpt_command](catalog, args)
    except CheckpointError as e:
        raise CkptUsageError(f"{e}; see stalwart ckpt ls {args.run}") from None


def _ls(catalog: CheckpointCatalog, args: argparse.Namespace) -> int:
    from stalwart.checkpoint.catalog import CheckpointError

    print(f"{'step':>10}  {'verified':8}  {'size':>10}  {'saved (UTC)':19}  {'world':>5}  layout")
    for step in catalog.committed_steps():
        try:
            m = catalog.manifest(step)
        except CheckpointError as e:
            print(f"{step:>10}  {'-':8}  {'-':>10}  {'-':19}  {'-':>5}  DAMAGED: {e}")
            continue
        print(
            f"{step:>10}  {'yes' if m.verified else 'no':8}  {_size(m.total_bytes):>10}  {_time(m.created):19}  "
            f"{m.world_size:>5}  {_layout(m.layout)}"
        )
    return 0


def _verify(catalog: CheckpointCatalog, args: argparse.Namespace) -> int:
    steps = [args.step] if args.step is not None else catalog.committed_steps()
    bad = 0
    for step in steps:
        problems = catalog.verify(step)
        for problem in problems:
            print(f"step {step}: {problem}", file=sys.stderr)
        if problems:
            bad += 1
        else:
            m = catalog.manifest(step)
            print(f"step {step}: ok ({len(m.files)} files, {_size(m.total_bytes)}, {m.checksum})")
    if bad:
        print(
            f"stalwart ckpt verify: {bad} of {len(steps)} steps damaged; a load falls back past them", file=sys.stderr
        )
    return 1 if bad else 0


def _inspect(catalog: CheckpointCatalog, args: argparse.Namespace) -> int:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    m = catalog.manifest(args.step)
    print(f"step {m.step} under {catalog.base_url}")
    print(f"  saved {_time(m.created)} UTC, verified: {'yes' if m.verified else 'no'}")
    print(f"  world size {m.world_size}, layout {_layout(m.layout)}, config hash {m.config_hash or '-'}")
    print(f"  {len(m.files)} files, {_size(m.total_bytes)}, checksum {m.checksum}")
    if m.model:
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
        print("  model " + ", ".join(f"{k}={m.model[k]}" for k in keys if k in m.model))
    metadata = _reader(catalog, args.step).read_metadata()
    rows = []
    for name, meta in sorted(metadata.state_dict_metadata.items()):
        if isinstance(meta, TensorStorageMetadata):
            rows.append(
                (
                    name,
                    str(list(meta.size)),
                    str(meta.properties.dtype).removeprefix("torch."),
                    f"{len(meta.chunks)} shards",
                )
            )
        else:
            rows.append((name, "-", "object", "1 blob"))
    width = max(len(r[0]) for r in rows)
    print(f"  {len(rows)} entries:")
    for name, shape, dtype, chunks in rows:
        print(f"    {name:<{width}}  {shape:<14} {dtype:<9} {chunks}")
    return 0


def _export(catalog: CheckpointCatalog, args: argparse.Namespace) -> int:
    import torch
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    out = Path(args.out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise CkptUsageError(f"{out} already exists; give --out a new path")
    m = catalog.manifest(args.step)
    if args.format == "hf" and not m.model:
        raise CkptUsageError(
            f"step {args.step}'s manifest records no model config (saved by an older stalwart); use --format torch"
        )
    problems = catalog.verify(args.step)
    if problems:
        print(
            f"stalwart ckpt: error: step {args.step} is damaged ({problems[0]}); export an earlier step",
            file=sys.stderr,
        )
        return 1
    state: dict[str, Any] = {}
    # What DCP's dcp_to_torch_save does (the planner rebuilds every full tensor from its shards),
    # with this step's reader so that s3:// works too; dcp.load would fill a copy of ``state``.
    _load_state_dict(
        state, storage_reader=_reader(catalog, args.step), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    if args.format == "torch":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
    else:
        from stalwart.model.hf import args_from_hf_config, save_hf_checkpoint

        save_hf_checkpoint(state["model"], args_from_hf_config(m.model), out)
    print(f"exported step {args.step} ({args.format}) to {out}")
    return 0


def _reader(catalog: CheckpointCatalog, step: int):  # noqa: ANN202 (a DCP StorageReader; torch is imported lazily)
    from stalwart.checkpoint.manager import storage_reader

    return storage_reader(catalog.storage, catalog.step_dir(step))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _time(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _layout(layout: dict[str, Any]) -> str:
    degrees = [f"{k}={v}" for k, v in layout.items() if v not in (1, None)]
    return " ".join(degrees) or "single"
