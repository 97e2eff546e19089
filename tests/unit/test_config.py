"""Config loading: TOML + overrides, typed coercion, and errors that name the key and the fix."""

from pathlib import Path

import pytest

from stalwart.runtime.config import CONFIGS_DIR, ConfigError, load_config, parse_overrides


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def test_defaults_file_then_overrides(tmp_path):
    path = write(tmp_path, "[training]\nlr = 1e-3\nsteps = 10\n[job]\nname = 'x'\n")
    cfg = load_config(path, ["--training.steps", "20", "--parallel.tp=2", "--data.shuffle", "false"])
    assert cfg.training.lr == 1e-3
    assert cfg.training.steps == 20
    assert cfg.parallel.tp == 2
    assert cfg.data.shuffle is False
    assert cfg.run_dir == Path("runs/x")


def test_shipped_config_by_name():
    cfg = load_config("debug")
    assert cfg.model.flavor == "debug"
    assert (CONFIGS_DIR / "debug.toml").is_file()


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("[training]\nlrr = 1\n", [], "unknown key 'training.lrr'.*did you mean 'lr'.*valid keys in \\[training\\]"),
        ("[trainning]\nlr = 1\n", [], "unknown section \\[trainning\\].*did you mean 'training'"),
        (
            "",
            ["--training.decay", "exp"],
            "training.decay = 'exp' is not allowed; choose one of 'cosine', 'linear', 'constant'",
        ),
        ("", ["--training.steps", "ten"], "training.steps = 'ten' is not an integer"),
        ("[training]\nsteps = 0\n", [], "training.steps = 0 must be at least 1"),
        (
            "",
            ["--checkpoint.s3_max_attempts", "-1"],
            "checkpoint.s3_max_attempts = -1 must be 0 \\(botocore's default\\) or a number",
        ),
        ("", ["--data.source", "files"], 'data.source = "files" needs data.path'),
        (
            "",
            ["--data.source", "files", "--data.path", "/nonexistent/corpus"],
            "data.path '/nonexistent/corpus' does not exist",
        ),
        ("", ["--training.lr"], "override '--training.lr' has no value"),
        ("", ["stray"], "unexpected argument 'stray'"),
        ("steps = 3\n", [], "top-level key 'steps'.*must be a \\[section\\] table"),
        ("[training\n", [], "is not valid TOML"),
    ],
)
def test_bad_input_names_key_and_fix(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text), overrides)


def test_missing_config_lists_shipped_names():
    with pytest.raises(ConfigError, match="config 'nope' not found.*debug"):
        load_config("nope")


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c.d-e=2"]) == [("a", "b", "1"), ("c", "d_e", "2")]


WORLD_FOR_FLAVOR = {"debug": 4, "debug-3d": 8, "demo": 8, "1B": 8, "3B": 8, "8B": 64, "70B": 256, "405B": 16384}


def test_every_shipped_config_plans_at_a_realistic_scale():
    """Each flavor config parses and its layout validates at a cluster size it is meant for."""
    from stalwart.runtime.plan import plan_job

    shipped = sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))
    assert set(shipped) == set(WORLD_FOR_FLAVOR)
    for name in shipped:
        cfg = load_config(name, ["--data.source", "stdlib", "--data.tokenizer", "byte"])
        plan = plan_job(cfg, WORLD_FOR_FLAVOR[name])
        assert plan.dims.world_size == WORLD_FOR_FLAVOR[name]
        assert plan.model_args.vocab_size >= 258


def test_flavor_config_without_its_data_says_what_is_missing():
    with pytest.raises(ConfigError, match="data.path 'data/corpus' does not exist"):
        load_config("8B")
