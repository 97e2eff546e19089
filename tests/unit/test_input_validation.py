"""Every config key and CLI flag, driven with generated values: the outcome is a job plan or one UserError.

The CLI's own parser and check functions run in-process (``cli.train.check_train``,
``launcher.main.check_launch``): exactly what ``stalwart train`` / ``stalwart launch`` do before any
rank starts. Generated values cover every sign, NaN and infinities, wrong types, empty and unknown
names; bounded by ``max_examples`` and a deadline so the whole file takes a few seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stalwart.cli.demo import check_demo
from stalwart.cli.main import build_parser, main
from stalwart.cli.train import check_train
from stalwart.errors import UserError
from stalwart.jobenv import PARENT_PID_ENV
from stalwart.launcher.main import check_launch
from stalwart.launcher.plan import NodePlan
from stalwart.runtime.config import BOUNDS, Config, load_config
from stalwart.runtime.plan import JobPlan

SECTIONS = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
KEYS = [
    (section, f.name, typing.get_type_hints(cls)[f.name])
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
]

_numbers = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([0, 1, -1, 2, 3, 4, 8, 10**9, 2**63, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 1e300, 0.5]),
)
_junk = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e3", "0x10", "true", "none", "{x}", "a\x00b", "☃"]),
)


def _value_text(hint: object) -> st.SearchStrategy[str]:
    """A command-line value for a key of type ``hint``: often a plausible one (so that plans do form and a
    single bad value among good ones is what decides), otherwise anything."""
    own: st.SearchStrategy[str]
    if typing.get_origin(hint) is typing.Literal:
        own = st.sampled_from([str(a) for a in typing.get_args(hint)])
    elif hint is bool:
        own = st.sampled_from(["true", "false", "1", "0", "yes", "maybe"])
    elif hint in (int, float):
        plausible = st.sampled_from(
            ["1", "2", "4", "8", "16", "64"] + (["0.5", "1e-3", "0.9"] if hint is float else [])
        )
        return st.one_of(plausible, plausible, plausible, _numbers.map(str), _junk)
    else:
        own = _junk
    return st.one_of(own, own, _numbers.map(str), _junk)


def _override() -> st.SearchStrategy[list[str]]:
    known = st.sampled_from(KEYS).flatmap(
        lambda k: _value_text(k[2]).map(
            lambda v: [f"--{k[0]}.{k[1]}", v] if not v.startswith("-") else [f"--{k[0]}.{k[1]}={v}"]
        )
    )
    unknown = st.tuples(st.sampled_from([*SECTIONS, "", "trainning", "x"]), _junk).map(
        lambda sk: [f"--{sk[0]}.{sk[1] or 'zz'}=1"]
    )
    return st.one_of(known, known, known, known, known, unknown)


def _overrides() -> st.SearchStrategy[list[str]]:
    return st.lists(_override(), max_size=4).map(lambda groups: [a for g in groups for a in g])


def _flag_value() -> st.SearchStrategy[str]:
    common = st.sampled_from(["1", "2", "4", "1:2", "2:1", "0:4", "3:x"])
    return st.one_of(common, common, common, _numbers.map(str), _junk)


def _outcome_of(run: typing.Callable[[], object]) -> object:
    """The call's result, or its UserError; any other exception fails the property (with the input)."""
    try:
        return run()
    except UserError as e:
        assert "\n" not in str(e).strip(), f"not one line: {e!r}"
        assert "Traceback" not in str(e)
        return e


PROPERTY = settings(
    max_examples=100, deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


_RANKS = st.sampled_from(["1", "2", "4"])


@settings(max_examples=100, deadline=5000)
@given(nproc=_flag_value())
def test_train_rank_count_flag_gives_a_plan_or_one_user_error(nproc: str) -> None:
    def plan() -> tuple[Config, JobPlan]:
        args, extra = build_parser().parse_known_args(["train", "--config", "debug", f"--nproc-per-node={nproc}"])
        return check_train(args, extra)

    outcome = _outcome_of(plan)
    assert isinstance(outcome, UserError) or outcome[1].dims.world_size == int(nproc)


@PROPERTY
@given(nproc=_RANKS, overrides=_overrides())
def test_train_config_and_flags_give_a_plan_or_one_user_error(nproc: str, overrides: list[str]) -> None:
    argv = ["train", "--config", "debug", f"--nproc-per-node={nproc}", *overrides]

    def plan() -> tuple[Config, JobPlan]:
        args, extra = build_parser().parse_known_args(argv)
        return check_train(args, extra)

    outcome = _outcome_of(plan)
    if not isinstance(outcome, UserError):
        cfg, job = outcome
        assert isinstance(job, JobPlan) and job.dims.world_size == int(nproc)
        for key, bound in BOUNDS.items():  # what passed is inside its declared range
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            assert bound.admits(value) or value == -1, (key, value)


def _flags_of(command: str) -> list[str]:
    """Every long flag of ``stalwart COMMAND`` but --help and --config, read from the parser itself."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    names = [o for a in sub.choices[command]._actions for o in a.option_strings if o.startswith("--")]
    return sorted({n.replace("_", "-") for n in names} - {"--help", "--config"})


LAUNCH_FLAGS = _flags_of("launch")


@PROPERTY
@given(flags=st.dictionaries(st.sampled_from(LAUNCH_FLAGS), _flag_value(), max_size=5), overrides=_overrides())
def test_launch_flags_and_config_give_a_node_plan_or_one_user_error(flags: dict[str, str], overrides: list[str]):
    argv = ["launch", "--config", "debug", *(f"{k}={v}" for k, v in flags.items()), *overrides]

    def plan() -> object:
        args, extra = build_parser().parse_known_args(argv)
        return check_launch(args, extra)

    outcome = _outcome_of(plan)
    if not isinstance(outcome, UserError):
        launch, cfg, nodes = outcome
        assert isinstance(nodes, NodePlan) and nodes.active_nodes(launch.min_nodes) >= 1
        assert 1 <= launch.nproc_per_node and math.isfinite(launch.peer_timeout) and launch.peer_timeout > 0


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.dictionaries(st.sampled_from(_flags_of("demo")), _flag_value(), max_size=4), overrides=_overrides())
def test_demo_flags_and_config_are_checked_before_anything_starts(flags: dict[str, str], overrides: list[str]) -> None:
    flags.pop("--chaos", None)  # a switch, no value
    argv = ["demo", *(f"{k}={v}" for k, v in flags.items()), *overrides]

    def check() -> None:
        args, extra = build_parser().parse_known_args(argv)
        check_demo(args, extra)

    _outcome_of(check)


TOML_VALUES = st.one_of(
    _numbers.map(lambda v: "nan" if v != v else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))),
    st.booleans().map(lambda b: "true" if b else "false"),
    _junk.map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.sampled_from(["[1, 2]", "{ a = 1 }", "1979-05-27"]),
)


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(st.tuples(st.sampled_from(KEYS), TOML_VALUES), max_size=5))
def test_toml_values_of_every_type_give_a_config_or_one_user_error(tmp_path: Path, items: list) -> None:
    by_section: dict[str, dict[str, str]] = {}
    for (section, key, _), value in items:
        by_section.setdefault(section, {})[key] = value
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in kv.items()) for s, kv in by_section.items())
    path = tmp_path / "job.toml"
    path.write_text(text, encoding="utf-8")
    _outcome_of(lambda: load_config(str(path)))


def test_every_numeric_key_has_a_declared_bound() -> None:
    numeric = {f"{s}.{k}" for s, k, hint in KEYS if hint in (int, float)}
    assert numeric == set(BOUNDS), f"missing: {sorted(numeric - set(BOUNDS))}, stale: {sorted(set(BOUNDS) - numeric)}"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--config", "debug", "--nproc-per-node", "0"], "--nproc-per-node: 0 must be at least 1"),
        (
            ["train", "--config", "debug", "--training.beta2", "1"],
            "training.beta2 = 1.0 must be at least 0 and below 1",
        ),
        (["train", "--config", "debug", "--training.max_grad_norm", "nan"], "training.max_grad_norm = nan"),
        (["train", "--config", "debug", "--health.heartbeat_interval_s", "inf"], "health.heartbeat_interval_s = inf"),
        (
            ["train", "--config", "debug", "--checkpoint.keep_last", "-3"],
            "checkpoint.keep_last = -3 must be at least 1",
        ),
        (["train", "--config", "debug", "--training.threads_per_rank", "-1"], "training.threads_per_rank = -1"),
        (["train", "--config", "debug", "--data.max_tokens", "-5"], "data.max_tokens = -5"),
        (["train"], "the following arguments are required: --config"),
        (["launch", "--config", "debug", "--nproc-per-node", "0"], "--nproc-per-node 0: must be at least 1"),
        (["launch", "--config", "debug", "--nproc-per-node", "-1"], "--nproc-per-node -1: must be at least 1"),
        (["launch", "--config", "debug", "--peer-timeout", "nan"], "--peer-timeout nan"),
        (["launch", "--config", "debug", "--rdzv-backend", "zk"], "invalid choice: 'zk'"),
        (["ckpt", "nonsense"], "invalid choice: 'nonsense'"),
        (["train", "--config", "debug", "--checkpoint.url", "ftp2://x/y"], "no storage is known for ftp2://"),
        (["train", "--config", "debug", "--checkpoint.url", "s3://"], "names no bucket"),
        (["demo", "--nodes", "0"], "argument --nodes: 0 must be at least 1"),
        (["demo", "--nproc-per-node", "-1"], "argument --nproc-per-node: -1 must be at least 1"),
        (["demo", "--training.lr", "nan"], "training.lr = nan"),
        (["goodput", "simulate", "--days", "nan"], "0 < --days <= 3650"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)  # main() exports it; keep it out of later tests
    assert main(argv) == 2
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], out.err
    assert "Traceback" not in out.err + out.out


def test_config_files_that_are_not_utf8_or_not_tokenizers_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(PARENT_PID_ENV, raising=False)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("[job]\nname = 'caf\xe9'\n".encode("latin-1"))
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("this is not a tokenizer")
    for argv, expected in (
        (["train", "--config", str(latin1)], "is not UTF-8 text"),
        (["train", "--config", "debug", "--data.tokenizer", str(tokenizer)], "is not a usable Hugging Face tokenizer"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
