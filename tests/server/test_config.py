"""Server configuration: CLI flags over RETD_* variables over the TOML file over defaults."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from retd.server.bench.suites import SUITES
from retd.server.config import ConfigError, ServerConfig, add_arguments, load_config


def parse(argv: list[str], env: dict[str, str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_config(parser.parse_args(argv), env or {})


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "retd.toml"
    path.write_text(text)
    return path


def test_defaults_with_one_checkpoint(checkpoint: Path) -> None:
    config = parse(["--checkpoint", str(checkpoint)])
    assert (config.host, config.port, config.grace_period) == ("127.0.0.1", 50051, 10.0)
    assert config.default_model == ""  # settled once the models are loaded (their kinds known)
    (model,) = config.models
    assert (model.name, model.checkpoint, model.settings.device) == ("ret_v21", checkpoint, "auto")
    scheduler = model.settings.scheduler
    assert (scheduler.max_batch_size, scheduler.max_queue_size, scheduler.batching) == (
        32,
        1024,
        "continuous",
    )
    assert config.access_log is False
    assert config.switch_interval_ms == 0.2
    assert parse(["--checkpoint", str(checkpoint), "--access-log", "on"]).access_log is True
    assert parse(["--checkpoint", str(checkpoint)], {"RETD_ACCESS_LOG": "yes"}).access_log is True


def test_flags_beat_environment_which_beats_toml(tmp_path: Path, checkpoint: Path) -> None:
    toml = write_toml(
        tmp_path,
        f'port = 1111\ngrace_period = 3\nmax_batch_size = 8\nlog_level = "debug"\n'
        f'[[models]]\nname = "a"\ncheckpoint = "{checkpoint}"\n',
    )
    env = {"RETD_PORT": "2222", "RETD_GRACE_PERIOD": "4"}
    config = parse(["--config", str(toml), "--port", "3333"], env)
    assert config.port == 3333  # flag over env over TOML
    assert config.grace_period == 4.0  # env over TOML
    assert config.model_defaults.scheduler.max_batch_size == 8  # TOML only
    assert config.models[0].settings.scheduler.max_batch_size == 8
    assert config.log_level == "DEBUG"
    assert [m.name for m in config.models] == ["a"]


def test_toml_models_take_per_model_overrides_over_server_wide_values(
    tmp_path: Path, checkpoint: Path
) -> None:
    toml = write_toml(
        tmp_path,
        'device = "cpu"\nmax_batch_size = 16\n'
        '[[models]]\nname = "a"\ncheckpoint = "ck"\nmax_batch_size = 4\nbatching = "static"\n'
        "steps_per_call = 8\n"
        '[[models]]\nname = "b"\ncheckpoint = "/abs/ck"\n',
    )
    env = {"RETD_MAX_WAIT_MS": "2.5", "RETD_STEPS_PER_CALL": "2"}
    a, b = parse(["--config", str(toml)], env).models
    assert a.checkpoint == tmp_path / "ck"  # relative to the TOML file
    ours, theirs = a.settings.scheduler, b.settings.scheduler
    assert (ours.max_batch_size, ours.batching, a.settings.device, ours.max_wait_ms) == (
        4,
        "static",
        "cpu",
        2.5,
    )
    assert (b.checkpoint, theirs.max_batch_size, theirs.batching) == (
        Path("/abs/ck"),
        16,
        "continuous",
    )
    assert (ours.steps_per_call, theirs.steps_per_call) == (8, 2)


def test_models_from_flags_and_environment(checkpoint: Path) -> None:
    config = parse(["--model", f"x={checkpoint}", "--model", f"y={checkpoint}"])
    assert [m.name for m in config.models] == ["x", "y"] and config.default_model == ""
    config = parse([], {"RETD_MODELS": f"p={checkpoint},q={checkpoint}", "RETD_DEFAULT_MODEL": "q"})
    assert [m.name for m in config.models] == ["p", "q"] and config.default_model == "q"
    config = parse([], {"RETD_CHECKPOINT": str(checkpoint)})
    assert [m.name for m in config.models] == ["ret_v21"]


def test_no_model_named_serves_the_shipped_checkpoint() -> None:
    from retd.model.checkpoint import DEFAULT_CHECKPOINT

    (model,) = parse([]).models
    assert (model.name, model.checkpoint) == ("ret_v21", DEFAULT_CHECKPOINT)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "70000"], {}, "port: expected 0..65535"),
        (["--port", "http"], {}, "port: expected an integer"),
        (["--max-batch-size", "0"], {}, "max_batch_size: expected an integer >= 1"),
        (["--grace-period", "-1"], {}, "grace_period: expected a number >= 0"),
        (["--batching", "dynamic"], {}, "batching: expected 'continuous' or 'static'"),
        (["--steps-per-call", "0"], {}, "steps_per_call: expected an integer >= 1"),
        (["--switch-interval-ms", "0"], {}, "switch_interval_ms: expected a number > 0"),
        ([], {"RETD_SWITCH_INTERVAL_MS": "inf"}, "switch_interval_ms: expected a number > 0"),
        (["--log-level", "loud"], {}, "log_level: expected one of"),
        (["--worker-cpus", "last"], {}, "worker_cpus: expected auto, none or a CPU list"),
        ([], {"RETD_WORKER_CPUS": "3-1"}, "worker_cpus: the range '3-1' runs backwards"),
        (["--worker-cpus", "1,"], {}, "worker_cpus: expected auto, none or a CPU list"),
        ([], {"RETD_MAX_QUEUE_SIZE": "many"}, "max_queue_size: expected an integer"),
        (["--model", "nameonly"], {}, "--model: expected NAME=DIR"),
        (["--default-model", "zzz"], {}, "default_model: 'zzz' is not among the models"),
    ],
)
def test_bad_settings_name_the_setting(
    checkpoint: Path, argv: list[str], env: dict[str, str], message: str
) -> None:
    needs_model = [] if argv[:1] == ["--model"] or not (argv or env) else ["--checkpoint", "c"]
    with pytest.raises(ConfigError) as raised:
        parse(argv + needs_model, env)
    assert message in str(raised.value)


def test_worker_cpus_from_flags_environment_and_toml(tmp_path: Path, checkpoint: Path) -> None:
    model = ["--checkpoint", str(checkpoint)]
    assert parse(model).worker_cpus == "auto"
    assert parse([*model, "--worker-cpus", "3,1,2"]).worker_cpus == "1-3"
    assert parse(model, {"RETD_WORKER_CPUS": "NONE"}).worker_cpus == "none"
    for value, written in (("[0, 2, 3]", "0,2-3"), ("5", "5"), ('"4-5"', "4-5")):
        toml = write_toml(tmp_path, f"worker_cpus = {value}\n")
        assert parse([*model, "--config", str(toml)]).worker_cpus == written


def test_bad_toml_is_reported_with_its_path(tmp_path: Path) -> None:
    broken = write_toml(tmp_path, "port = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse(["--config", str(broken)])
    unknown = write_toml(tmp_path, 'colour = "blue"\n[[models]]\nname = "a"\ncheckpoint = "c"\n')
    with pytest.raises(ConfigError, match=r"unknown keys \['colour'\]"):
        parse(["--config", str(unknown)])
    duplicate = write_toml(
        tmp_path,
        '[[models]]\nname = "a"\ncheckpoint = "c"\n[[models]]\nname = "a"\ncheckpoint = "d"\n',
    )
    with pytest.raises(ConfigError, match="names must be unique"):
        parse(["--config", str(duplicate)])
    with pytest.raises(ConfigError, match="cannot read"):
        parse(["--config", str(tmp_path / "missing.toml")])


def test_a_model_repository_needs_no_checkpoint_and_watch_defaults_to_two_seconds(
    tmp_path: Path,
) -> None:
    config = parse(["--model-repo", str(tmp_path), "--watch"])
    assert (config.repository.path, config.repository.watch, config.models) == (tmp_path, 2.0, ())
    named = parse(
        ["--model-repo", str(tmp_path), "--repo-models", "a, b,a", "--watch", "0.5"],
        env={"RETD_UNLOAD_TIMEOUT": "7", "RETD_DEFAULT_MODEL": "b"},
    )
    repository = named.repository
    assert (repository.models, repository.watch, repository.unload_timeout) == (
        ("a", "b"),
        0.5,
        7.0,
    )
    assert named.default_model == "b"  # known once the repository is read
    defaults = parse(["--model-repo", str(tmp_path), "--dtype", "bfloat16"]).model_defaults
    assert defaults.dtype == "bfloat16"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--watch", "1"], "watch: needs --model-repo"),
        (["--model-repo", "/no/such/repository"], "model_repo: /no/such/repository is not a"),
        (["--model-repo", ".", "--watch", "-1"], "watch: expected a number >= 0"),
    ],
)
def test_bad_repository_settings_name_the_setting(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(argv)


def test_draft_settings_reach_each_models_settings(checkpoint: Path) -> None:
    (model,) = parse(["--checkpoint", str(checkpoint)]).models
    assert (model.settings.draft_tokens, model.settings.draft_ngram) == (2, 3)
    argv = ["--checkpoint", str(checkpoint), "--draft-tokens", "0"]
    (model,) = parse(argv, {"RETD_DRAFT_NGRAM": "5"}).models
    assert (model.settings.draft_tokens, model.settings.draft_ngram) == (0, 5)
    with pytest.raises(ConfigError, match="draft_ngram"):
        parse(["--checkpoint", str(checkpoint), "--draft-ngram", "0"])
    with pytest.raises(ConfigError, match="draft_tokens"):
        parse(["--checkpoint", str(checkpoint)], {"RETD_DRAFT_TOKENS": "-1"})


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_bench_suite_starts_servers_with_flags_retd_takes(
    suite: str, checkpoint: Path
) -> None:
    for scenario in SUITES[suite](1.0):
        if scenario.raw:
            continue
        args = shlex.split(scenario.server_args.format(otlp="127.0.0.1:4317"))
        parse(["--checkpoint", str(checkpoint), *args])
