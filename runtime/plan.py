"""The job plan: what a config and a world size imply, checked before any rank starts.

Torch-free on purpose: ``stalwart train``, ``stalwart launch`` and the launcher's node plan call
:func:`plan_job` before anything heavy is imported, so a bad layout costs milliseconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from stalwart.errors import ConfigError
from stalwart.model.args import ModelArgs, get_flavor, hf_shape
from stalwart.parallel.dims import ParallelDims
from stalwart.runtime.config import Config
from stalwart.runtime.data.tokenizer import Tokenizer, build_tokenizer


@dataclass(frozen=True)
class JobPlan:
    """What the config and world size imply, checked before any process group work."""

    dims: ParallelDims
    tokenizer: Tokenizer
    model_args: ModelArgs


def model_args_for(cfg: Config, tokenizer_vocab: int) -> ModelArgs:
    """The flavor's shapes with the config's overrides; the vocabulary must hold every token id."""
    args = get_flavor(cfg.model.flavor)
    overrides = {k: v for k, v in (("vocab_size", cfg.model.vocab_size), ("n_layers", cfg.model.n_layers)) if v > 0}
    args = dataclasses.replace(args, **overrides)
    if args.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model vocab_size={args.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} ids; "
            f"set model.vocab_size >= {tokenizer_vocab} (a multiple of 8 keeps tensor parallelism easy)"
        )
    return args


def check_layout(cfg: Config, world_size: int) -> ParallelDims:
    """The parallel degrees for ``world_size`` ranks, with the batch split checked (no files read)."""
    p = cfg.parallel
    dims = ParallelDims.resolve(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, world_size)
    dims.validate_batch(cfg.training.global_batch_size, cfg.training.microbatch_size, p.pp_microbatches)
    return dims


def plan_job(cfg: Config, world_size: int) -> JobPlan:
    """Every layout check that can fail, so that a bad config fails before ranks start."""
    dims = check_layout(cfg, world_size)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    model_args = model_args_for(cfg, tokenizer.vocab_size)
    dims.validate_model(model_args, cfg.data.seq_len)
    return JobPlan(dims, tokenizer, model_args)


def check_run_directory(cfg: Config, plan: JobPlan) -> None:
    """A run that resumes must find checkpoints of this model and tokenizer; one line naming what differs else.

    Runs before any rank starts (``stalwart train``, ``stalwart launch``): otherwise DCP fails with
    "Missing key" deep in the load, or loads a state of another shape. The parallel layout may differ
    (loads reshard). Storage that cannot be read is left to the trainer's start-up, which reports it.
    """
    if not cfg.checkpoint.enabled or cfg.checkpoint.resume == "none":
        return
    from stalwart.checkpoint.catalog import CheckpointCatalog
    from stalwart.checkpoint.identity import check_identity
    from stalwart.checkpoint.storage import s3_storage_options

    c = cfg.checkpoint
    try:
        catalog = CheckpointCatalog.open(cfg.checkpoint_url, s3_storage_options(c.s3_endpoint, c.s3_max_attempts))
        newest = catalog.newest_manifest()
    except Exception:  # unreachable or unknown storage: not this check's to report
        return
    if newest is not None:
        step, manifest = newest
        check_identity(step, manifest, hf_shape(plan.model_args), plan.tokenizer.identity, cfg.checkpoint_url)
