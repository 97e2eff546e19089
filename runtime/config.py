"""Typed job configuration loaded from TOML, with ``--section.key value`` overrides.

Every key is a dataclass field, so a typo is an error that names the valid keys instead of a
silently ignored setting. Values are coerced from TOML or command-line strings by the field's
type; ``Literal`` fields list their allowed values in the error.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stalwart.checkpoint.naming import default_checkpoint_url
from stalwart.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class JobConfig:
    name: str = "stalwart"
    run_dir: str = "runs/{name}"
    """Where events, checkpoints and reports go; ``{name}`` expands to ``job.name``."""
    seed: int = 0
    description: str = ""


@dataclass
class ModelConfig:
    flavor: str = "debug"
    """One of model.args.FLAVORS: debug, 1B, 3B, 8B, 70B, 405B."""
    vocab_size: int = 0
    """0 keeps the flavor's vocabulary; set it to match a custom tokenizer."""
    n_layers: int = 0
    """0 keeps the flavor's depth; a smaller value gives a cheap model of the same width."""


@dataclass
class DataConfig:
    source: Literal["stdlib", "files"] = "stdlib"
    path: str = ""
    """File or folder of .txt/.jsonl/.py text, required when source = "files"."""
    jsonl_field: str = "text"
    tokenizer: str = "byte"
    """"byte" or the path of a Hugging Face tokenizer.json (or its folder)."""
    seq_len: int = 128
    shuffle: bool = True
    max_tokens: int = 0
    """0 uses the whole corpus; a positive cap makes tests and demos cheap."""


@dataclass
class TrainingConfig:
    steps: int = 300
    global_batch_size: int = 32
    """Samples per optimizer step for the whole job; kept constant when DP changes."""
    microbatch_size: int = 8
    """Samples per forward/backward on one data-parallel rank; the rest is accumulation."""
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    """Clip the total gradient norm to this (positive; inf turns clipping off)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    threads_per_rank: int = 0
    """CPU intra-op threads per rank; 0 divides the machine's cores among the local ranks."""
    activation_checkpoint: Literal["none", "full", "selective-layer", "selective-op"] = "none"
    """Recompute activations in backward to save memory: every block (full), every
    ``activation_checkpoint_every``-th block (selective-layer), or all but matmul/attention
    outputs (selective-op)."""
    activation_checkpoint_every: int = 2
    compile: bool = False
    """torch.compile each transformer block (inductor needs a C++ compiler on CPU)."""
    compile_backend: str = "inductor"


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    """Full replicas (DDP, or HSDP with dp_shard > 1); -1 takes what is left instead of dp_shard."""
    dp_shard: int = -1
    """-1 takes whatever the other degrees leave of the world size."""
    cp: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: Literal["1F1B", "Interleaved1F1B", "ZBVZeroBubble", "GPipe"] = "1F1B"
    pp_microbatches: int = 0
    """0 uses one pipeline microbatch per pipeline stage."""


@dataclass
class CheckpointConfig:
    enabled: bool = True
    url: str = ""
    """A path or s3://bucket/prefix; empty means RUN_DIR/checkpoints."""
    s3_endpoint: str = ""
    """endpoint_url for S3-compatible stores (e.g. a local test server)."""
    s3_max_attempts: int = 0
    """Attempts per S3 request before a save gives up (botocore, standard mode); 0 keeps botocore's default."""
    interval: int = 50
    """Save every this many steps (and at the last step)."""
    mode: Literal["async", "sync"] = "async"
    keep_last: int = 3
    keep_every: int = 0
    """Also keep every keep_every-th step for the long term; 0 keeps only the last ones."""
    resume: Literal["latest", "latest-verified", "none"] = "latest"
    preemption_grace_s: float = 60.0
    """Time allowed after SIGTERM to finish the step, save synchronously and exit 0."""
    memory_interval: int = 0
    """Copy the state to host memory (own node + a peer node) every this many steps; 0 turns the tier off."""
    memory_dir: str = ""
    """Where the host-memory tier lives; empty means a per-job directory on /dev/shm (tmpfs)."""
    lease_ttl_s: float = 30.0
    """The run lease's time to live: another job may take over a run whose holder renewed it no longer ago."""


@dataclass
class HealthConfig:
    healthd: str = ""
    """The node daemon's address (host:port or unix:PATH); empty uses $STALWART_HEALTHD, else no daemon."""
    heartbeat_interval_s: float = 0.5
    fingerprint_every: int = 50
    """Compare parameter fingerprints across data-parallel replicas every this many steps; 0 is off."""
    golden_every: int = 200
    """Run the golden workload on every rank at start-up and every this many steps; 0 is off."""
    spike_factor: float = 10.0
    """A loss/grad norm above median + factor × robust spread is an anomaly (replayed); 0 checks NaN/Inf only."""
    rollback_on_sdc: bool = True
    """Roll back to the last verified checkpoint when silent data corruption is found."""
    verify_checkpoints: bool = True
    """Mark a checkpoint verified once an SDC check passed at or after its step."""


@dataclass
class RecoveryConfig:
    in_process: bool = True
    """Under `stalwart launch`: when a peer rank dies, the survivors re-form the world in their own
    processes (model, optimizer and loader kept) and only the lost rank is replaced; off restarts
    every rank of the job."""
    max_reformations: int = 10
    """More in-process recoveries than this in one incarnation hand over to a whole-world restart."""
    reform_timeout_s: float = 60.0
    """A re-formation (the replacement included) that takes longer falls back to a whole-world restart."""


@dataclass
class LoggingConfig:
    log_every: int = 1
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s of one accelerator for MFU; 0 detects known GPUs, none on CPU."""


@dataclass
class Config:
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.job.run_dir.format(name=self.job.name))

    @property
    def checkpoint_url(self) -> str:
        return default_checkpoint_url(self.run_dir, self.checkpoint.url)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def layout_hash(self) -> str:
        """Hash of what must match for a checkpoint to continue the same run (not the layout)."""
        import hashlib
        import json

        same_run = {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "seed": self.job.seed,
        }
        return hashlib.sha256(json.dumps(same_run, sort_keys=True).encode()).hexdigest()[:16]


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a TOML value or a command-line string to the field's declared type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        return _coerce(key, value, args[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} = {value!r} is not a boolean; use true or false")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} is not an integer")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key} = {value!r} is not an integer") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} = {value!r} is not a number") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} is not a string; quote it in TOML")
        return value
    raise ConfigError(f"{key}: unsupported field type {hint}")  # a bug in this module, not the user's


def _apply(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    sections = _section_types()
    if section not in sections:
        raise ConfigError(
            f"unknown section [{section}] in {origin}{_suggest(section, list(sections))}; "
            f"valid sections: {', '.join(sections)}"
        )
    section_cls = sections[section]
    hints = typing.get_type_hints(section_cls)
    names = [f.name for f in dataclasses.fields(section_cls)]
    if key not in names:
        raise ConfigError(
            f"unknown key '{section}.{key}' in {origin}{_suggest(key, names)}; "
            f"valid keys in [{section}]: {', '.join(names)}"
        )
    setattr(getattr(cfg, section), key, _coerce(f"{section}.{key}", value, hints[key]))


def resolve_config_path(spec: str) -> Path:
    """A path as given, or the name of a shipped config (``debug`` → configs/debug.toml)."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = CONFIGS_DIR / f"{spec}.toml"
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))
    raise ConfigError(
        f"config '{spec}' not found; pass a TOML file path or one of the shipped configs: {', '.join(names)}"
    )


def parse_overrides(args: list[str]) -> list[tuple[str, str, str]]:
    """``["--training.lr", "1e-3", "--job.name=x"]`` → ``[("training", "lr", "1e-3"), ("job", "name", "x")]``."""
    out: list[tuple[str, str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(
                f"unexpected argument '{arg}'; overrides look like --section.key value (e.g. --training.lr 1e-3)"
            )
        dotted, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override '{arg}' has no value; write {arg} VALUE")
            value = args[i + 1]
            i += 1
        section, _, key = dotted.partition(".")
        out.append((section, key.replace("-", "_"), value))
        i += 1
    return out


def load_config(spec: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then command-line overrides, then cross-field checks."""
    cfg = Config()
    if spec:
        path = resolve_config_path(spec)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); TOML files must be UTF-8: save it as UTF-8"
            ) from None
        except OSError as e:
            raise ConfigError(
                f"cannot read config {path}: {e.strerror or e}; check the path and its permissions"
            ) from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"top-level key '{section}' in {path} must be a [section] table")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path))
    for section, key, value in parse_overrides(overrides or []):
        _apply(cfg, section, key, value, "command-line overrides")
    validate(cfg)
    return cfg


@dataclass(frozen=True)
class Bound:
    """The allowed range of one numeric key; ``fix`` says what a sensible value is."""

    low: float
    high: float
    fix: str
    low_open: bool = False
    """``low`` itself is not allowed (a strictly positive number)."""
    high_open: bool = False
    allow_inf: bool = False
    """``inf`` is a meaningful setting (e.g. no clipping); NaN never is."""
    zero: str = ""
    """What 0 means when it is allowed outside the range (``"off"``); 0 then passes."""

    def rule(self) -> str:
        low = f"greater than {self.low:g}" if self.low_open else f"at least {self.low:g}"
        high = f"below {self.high:g}" if self.high_open else f"at most {self.high:g}"
        text = f"{low} and {high}"
        if self.zero:
            text = f"0 ({self.zero}) or a number {text}"
        if self.allow_inf:
            text += ", or inf"
        return text

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and math.isnan(value):
            return False
        if isinstance(value, float) and math.isinf(value):
            return self.allow_inf and value > 0
        if self.zero and value == 0:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


_BIG = 10**9  # counts of steps or samples beyond this are typos, not jobs
_DEGREE = 1 << 16  # no parallel degree or world beyond 65,536 ranks
_SECONDS = 7 * 24 * 3600.0  # a week: longer timeouts are typos

BOUNDS: dict[str, Bound] = {
    "job.seed": Bound(0, 2**63 - 1, "use a non-negative integer"),
    "model.vocab_size": Bound(1, 1 << 22, "use 0 for the flavor's vocabulary or the tokenizer's size", zero="flavor's"),
    "model.n_layers": Bound(1, 1024, "use 0 for the flavor's depth or a small positive count", zero="flavor's"),
    "data.seq_len": Bound(1, 1 << 20, "use a positive sequence length such as 128"),
    "data.max_tokens": Bound(1, 10**15, "use 0 for the whole corpus or a positive token cap", zero="whole corpus"),
    "training.steps": Bound(1, _BIG, "use a positive number of optimizer steps"),
    "training.global_batch_size": Bound(1, _BIG, "use a positive number of samples per step"),
    "training.microbatch_size": Bound(1, _BIG, "use a positive number of samples per forward pass"),
    "training.lr": Bound(0, 10, "use a small positive learning rate such as 3e-4", low_open=True),
    "training.min_lr_ratio": Bound(0, 1, "use a fraction of lr such as 0.1"),
    "training.warmup_steps": Bound(0, _BIG, "use 0 or a positive number of steps"),
    "training.weight_decay": Bound(0, 10, "use a non-negative decay such as 0.1"),
    "training.beta1": Bound(0, 1, "AdamW needs 0 <= beta1 < 1; use 0.9", high_open=True),
    "training.beta2": Bound(0, 1, "AdamW needs 0 <= beta2 < 1; use 0.95", high_open=True),
    "training.eps": Bound(0, 1, "AdamW needs a small positive eps; use 1e-8", low_open=True),
    "training.max_grad_norm": Bound(
        0,
        1e12,
        "clipping multiplies every gradient by max_grad_norm / norm: a negative or NaN value turns the update into "
        "NaN, 0 into nothing; use a positive number such as 1.0, or inf for no clipping",
        low_open=True,
        allow_inf=True,
    ),
    "training.threads_per_rank": Bound(1, 4096, "use 0 to share the machine's cores among the ranks", zero="auto"),
    "training.activation_checkpoint_every": Bound(1, 1024, "use a positive block cadence such as 2"),
    "parallel.dp_replicate": Bound(1, _DEGREE, "use a positive degree, or -1 for 'whatever is left'"),
    "parallel.dp_shard": Bound(1, _DEGREE, "use a positive degree, or -1 for 'whatever is left'"),
    "parallel.cp": Bound(1, _DEGREE, "use a positive degree (1 is off)"),
    "parallel.tp": Bound(1, _DEGREE, "use a positive degree (1 is off)"),
    "parallel.pp": Bound(1, _DEGREE, "use a positive degree (1 is off)"),
    "parallel.pp_microbatches": Bound(1, _BIG, "use 0 for one per stage or a positive count", zero="one per stage"),
    "checkpoint.s3_max_attempts": Bound(1, 100, "use 0 or a number of attempts such as 5", zero="botocore's default"),
    "checkpoint.interval": Bound(1, _BIG, "use a positive number of steps between saves"),
    "checkpoint.keep_last": Bound(1, 10**6, "keep at least the newest checkpoint"),
    "checkpoint.keep_every": Bound(1, _BIG, "use 0 to keep only the last ones, or a step cadence", zero="off"),
    "checkpoint.preemption_grace_s": Bound(0, _SECONDS, "use a positive number of seconds such as 60", low_open=True),
    "checkpoint.memory_interval": Bound(1, _BIG, "use 0 (off) or a number of steps", zero="off"),
    "checkpoint.lease_ttl_s": Bound(0, _SECONDS, "use a positive number of seconds such as 30", low_open=True),
    "health.heartbeat_interval_s": Bound(0, 3600, "use a positive number of seconds such as 0.5", low_open=True),
    "health.fingerprint_every": Bound(1, _BIG, "use 0 to turn the check off, or a step cadence", zero="off"),
    "health.golden_every": Bound(1, _BIG, "use 0 to turn the check off, or a step cadence", zero="off"),
    "health.spike_factor": Bound(0, 1e6, "use 0 (NaN/Inf only) or a factor such as 10", low_open=True, zero="off"),
    "recovery.max_reformations": Bound(0, 10**6, "use 0 (always restart the world) or a count"),
    "recovery.reform_timeout_s": Bound(0, _SECONDS, "use a positive number of seconds such as 60", low_open=True),
    "logging.log_every": Bound(1, _BIG, "use a positive number of steps"),
    "logging.peak_tflops": Bound(
        0, 1e6, "use 0 to detect known GPUs, or the accelerator's peak", low_open=True, zero="detect"
    ),
}
"""Every int and float key of :class:`Config` (``tests/unit/test_config.py`` checks none is missing)."""

_ANY_DEGREE = ("parallel.dp_replicate", "parallel.dp_shard")  # -1 fills the rest of the world


def check_bounds(cfg: Config) -> None:
    """Every numeric key against :data:`BOUNDS`: type, finiteness and range, one line naming the fix."""
    for key, bound in BOUNDS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if key in _ANY_DEGREE and value == -1:
            continue
        if not bound.admits(value):
            raise ConfigError(f"{key} = {value!r} must be {bound.rule()}; {bound.fix}")


def validate(cfg: Config) -> None:
    """Every key's range (:data:`BOUNDS`), then checks that need more than one field or the file system."""
    from stalwart.model.args import get_flavor

    try:
        get_flavor(cfg.model.flavor)
    except ValueError as e:
        raise ConfigError(f"model.flavor: {e}") from None
    check_bounds(cfg)
    for key, text in (("job.name", cfg.job.name), ("job.run_dir", cfg.job.run_dir)):
        if not text.strip():
            raise ConfigError(f"{key} = {text!r} must not be empty; name the job (e.g. --{key} my-run)")
    for section, values in cfg.to_dict().items():
        for name, value in values.items():
            if isinstance(value, str) and "\x00" in value:
                raise ConfigError(f"{section}.{name} = {value!r} holds a NUL character; remove it")
    try:
        cfg.job.run_dir.format(name=cfg.job.name)
    except (KeyError, IndexError, ValueError, AttributeError):
        raise ConfigError(
            f"job.run_dir = {cfg.job.run_dir!r} is not a valid template; the only placeholder is {{name}} (write "
            "braces as {{ and }})"
        ) from None
    d = cfg.data
    if cfg.checkpoint.url and "://" in cfg.checkpoint.url:
        from stalwart.checkpoint.storage import url_problem  # fsspec: only for URLs

        problem = url_problem(cfg.checkpoint.url)
    else:
        problem = None
    if problem:
        raise ConfigError(f"checkpoint.url = {problem}")
    if d.source == "files":
        if not d.path:
            raise ConfigError('data.source = "files" needs data.path: a file or folder of .txt/.jsonl text')
        if not Path(d.path).exists():
            raise ConfigError(
                f"data.path '{d.path}' does not exist; pass a file or folder of .txt/.jsonl text, or use data.source "
                '= "stdlib"'
            )
    if d.tokenizer != "byte" and not Path(d.tokenizer).exists():
        raise ConfigError(
            f"data.tokenizer '{d.tokenizer}' does not exist; use \"byte\" or the path of a tokenizer.json"
        )
