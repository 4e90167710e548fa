"""`load_config`: CLI flags over `RETD_*` variables over the TOML file over the defaults,
into a `ServerConfig`; and a repository model's own settings (serving.toml)."""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from retd.server.config.parsers import optional_path
from retd.server.config.schema import ConfigError, ModelSettings, ModelSpec, ServerConfig
from retd.server.config.settings import MODEL_DEFAULTS, PER_MODEL, SETTINGS

T = TypeVar("T")

_BY_NAME = {setting.name: setting for setting in SETTINGS}
# The keys of a [[models]] table: who it is, and the settings it may override.
_MODEL_KEYS = {"name", "checkpoint", *PER_MODEL}


def updated(config: T, changes: Mapping[str, Any]) -> T:
    """`config` (a frozen dataclass) with `changes` made, by dotted field path
    (`{"scheduler.max_batch_size": 8}`); each dataclass changed checks itself again."""
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for path, value in changes.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, inner in nested.items():
        direct[head] = updated(getattr(config, head), inner)
    return replace(config, **direct)  # type: ignore[type-var]


def model_settings(
    values: Mapping[str, Any], base: ModelSettings, where: str = ""
) -> ModelSettings:
    """`base` with the per-model settings of `values` (by setting name, parsed) set; an error
    names `where` (a [[models]] table, a serving.toml) before the setting."""
    changes = {_BY_NAME[key].field.removeprefix(MODEL_DEFAULTS): values[key] for key in values}
    try:
        return updated(base, changes)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}" if where else str(exc)) from None


def parse_per_model(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The per-model settings of `table`, parsed; errors name `where`."""
    settings: dict[str, Any] = {}
    for key in PER_MODEL:
        if key in table:
            try:
                settings[key] = _BY_NAME[key].parse(table[key])
            except ConfigError as exc:
                raise ConfigError(f"{where}.{exc}") from None
    return settings


def model_settings_file(path: Path, base: ModelSettings) -> ModelSettings:
    """A repository model's own settings (`MODEL_REPO/<name>/serving.toml`): any of the
    per-model settings, over the server-wide ones (`base`); `base` when there is no such
    file."""
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return base
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(table) - set(PER_MODEL))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; expected some of {list(PER_MODEL)}")
    return model_settings(parse_per_model(table, str(path)), base, str(path))


@dataclass(frozen=True)
class _Model:
    """A model named by a flag, a variable or a [[models]] table, before its settings."""

    name: str
    checkpoint: Path
    own: Mapping[str, Any]  # the per-model settings its table sets, parsed
    where: str = ""


def _models_from_toml(entries: Any, base: Path) -> list[_Model]:
    if not isinstance(entries, list):
        raise ConfigError("models: expected an array of tables ([[models]])")
    models = []
    for index, entry in enumerate(entries):
        where = f"models[{index}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(entry) - _MODEL_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        if "name" not in entry or "checkpoint" not in entry:
            raise ConfigError(f"{where}: needs both 'name' and 'checkpoint'")
        checkpoint = Path(entry["checkpoint"])
        checkpoint = checkpoint if checkpoint.is_absolute() else base / checkpoint
        models.append(_Model(str(entry["name"]), checkpoint, parse_per_model(entry, where), where))
    return models


def _parse_model_pairs(pairs: Sequence[str], source: str) -> list[_Model]:
    models = []
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{source}: expected NAME=DIR, got {pair!r}")
        models.append(_Model(name.strip(), Path(path.strip()), {}))
    return models


def _named_after_its_card(checkpoint: Path) -> _Model:
    """A checkpoint served without a name is named after its card (else its directory)."""
    try:
        card = json.loads((checkpoint / "card.json").read_text())
        name = str(card.get("name") or card.get("architecture") or checkpoint.name)
    except (OSError, ValueError):
        name = checkpoint.name
    return _Model(name, checkpoint, {})


def _read_toml(config_file: Path) -> tuple[dict[str, Any], list[_Model]]:
    """The TOML file's settings (unparsed) and its [[models]]."""
    try:
        from_toml = tomllib.loads(Path(config_file).read_text())
    except OSError as exc:
        raise ConfigError(f"config: cannot read {config_file}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {config_file} is not valid TOML: {exc}") from None
    models = _models_from_toml(from_toml.pop("models", []), Path(config_file).resolve().parent)
    unknown = set(from_toml) - set(_BY_NAME)
    if unknown:
        raise ConfigError(f"config: unknown keys {sorted(unknown)} in {config_file}")
    return from_toml, models


def _models(
    args: argparse.Namespace, environ: Mapping[str, str], toml_models: list[_Model]
) -> list[_Model]:
    """The CLI's models, else the environment's, else the TOML file's."""
    models: list[_Model] = []
    if args.checkpoint is not None or args.model_specs:
        if args.checkpoint is not None:
            models.append(_named_after_its_card(args.checkpoint))
        models += _parse_model_pairs(args.model_specs or [], "--model")
    elif environ.get("RETD_CHECKPOINT") or environ.get("RETD_MODELS"):
        if environ.get("RETD_CHECKPOINT"):
            models.append(_named_after_its_card(Path(environ["RETD_CHECKPOINT"])))
        if environ.get("RETD_MODELS"):
            pairs = [p for p in environ["RETD_MODELS"].split(",") if p.strip()]
            models += _parse_model_pairs(pairs, "RETD_MODELS")
    else:
        models = toml_models
    return models


def load_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Merge parsed CLI flags over `RETD_*` variables over the TOML file over defaults."""
    environ = os.environ if environ is None else environ
    config_file = args.config or optional_path(environ.get("RETD_CONFIG"))
    from_toml: dict[str, Any] = {}
    toml_models: list[_Model] = []
    if config_file is not None:
        from_toml, toml_models = _read_toml(config_file)

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = getattr(args, setting.name, None)
        for variable in (setting.env, *setting.aliases):
            if raw is None:
                raw = environ.get(variable)
        if raw is None:
            raw = from_toml.get(setting.name)
        if raw is not None:
            values[setting.name] = setting.parse(raw)

    models = _models(args, environ, toml_models)
    repository = values.get("model_repo")
    if not models and repository is None:
        from retd.model.kinds import DEFAULT_CHECKPOINT

        if (DEFAULT_CHECKPOINT / "card.json").is_file():
            models = [_named_after_its_card(DEFAULT_CHECKPOINT)]
    if repository is not None and not repository.is_dir():
        raise ConfigError(f"model_repo: {repository} is not a directory")
    if not models and repository is None:
        raise ConfigError(
            "no model to serve: pass --checkpoint DIR (make one with `retd init-checkpoint`), "
            "--model NAME=DIR, RETD_CHECKPOINT, --model-repo DIR, or [[models]] in a --config "
            "file"
        )
    if values.get("watch") and repository is None:
        raise ConfigError("watch: needs --model-repo (the directory it polls)")

    server_wide = {key: value for key, value in values.items() if key in PER_MODEL}
    defaults = model_settings(server_wide, ModelSettings())
    specs = tuple(
        ModelSpec(m.name, m.checkpoint, model_settings(m.own, defaults, m.where)) for m in models
    )
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"models: names must be unique, repeated: {duplicates}")
    # An empty default is settled once the models are loaded (ModelRegistry.start: the first
    # generative one by name); with a repository, a named one need not be among `names`.
    default_model = values.get("default_model", "")
    if default_model and default_model not in names and repository is None:
        raise ConfigError(f"default_model: {default_model!r} is not among the models {names}")
    server = {_BY_NAME[key].field: value for key, value in values.items() if key not in PER_MODEL}
    return updated(
        ServerConfig(),
        {
            **server,
            "telemetry.metrics_port_given": "metrics_port" in values,
            "models": specs,
            "model_defaults": defaults,
            "config_file": Path(config_file) if config_file else None,
            "given": frozenset(values),
        },
    )
