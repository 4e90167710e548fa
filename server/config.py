"""Server configuration: frozen dataclasses built from CLI flags, `RETD_*` environment
variables and an optional TOML file, in that order of precedence.

Every server-wide setting is declared once in `SETTINGS`; its CLI flag (`--grace-period`),
environment variable (`RETD_GRACE_PERIOD`) and TOML key (`grace_period`) follow from its name.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

# Decode's default loop breakers are declared with the model (`retd eval` measures them too).
from retd.model.defaults import DecodeDefaults

DEFAULT_PORT = 50051
MiB = 1024 * 1024
ZERO_PORT = {"port": "picks a free port", "metrics_port": "no metrics endpoint"}


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the setting."""


# What one DecodeBatch item takes on the wire: a sentence embedding of the encoder's 768
# float32 values, raw or as a packed float list, and its framing (field tags, lengths, the
# raw shape: 13 bytes; tests/server/test_message_limits.py measures it).
EMBEDDING_DIM = 768
BATCH_ITEM_WIRE_BYTES = EMBEDDING_DIM * 4 + 16


def message_bytes_for(max_batch_items: int) -> int:
    """The request size limit that agrees with `max_batch_items`: room for a DecodeBatch of
    twice that many embeddings and 1 MiB of other fields, in whole MiB (8 MiB for 1024), so
    that a batch over the item limit gets INVALID_ARGUMENT naming that limit rather than
    RESOURCE_EXHAUSTED from the transport."""
    needed = 2 * max_batch_items * BATCH_ITEM_WIRE_BYTES + MiB
    return -(-needed // MiB) * MiB


# Bounds of the loop breakers, for the settings below and for requests (server/validation.py).
MAX_NGRAM_SIZE = 256  # bytes; no answer is longer
MAX_REPETITION_PENALTY = 10.0


@dataclass(frozen=True)
class ModelSpec:
    """One model to load: a checkpoint directory served under `name`."""

    name: str
    checkpoint: Path
    device: str = "auto"
    dtype: str = "float32"
    max_batch_size: int = 32
    max_queue_size: int = 1024
    max_wait_ms: float = 0.0
    batching: str = "continuous"
    # Its version: the directory name in a model repository, 1 for a checkpoint named directly.
    version: int = 1


# Settings a [[models]] table may override for its model.
PER_MODEL = ("device", "dtype", "max_batch_size", "max_queue_size", "max_wait_ms", "batching")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    models: tuple[ModelSpec, ...] = ()
    default_model: str = ""
    device: str = "auto"
    dtype: str = "float32"
    max_batch_size: int = 32
    max_queue_size: int = 1024
    max_wait_ms: float = 0.0
    batching: str = "continuous"
    torch_threads: int = 0
    grace_period: float = 10.0
    max_message_bytes: int = 0  # 0: message_bytes_for(max_batch_items); see message_limit
    log_level: str = "INFO"
    log_format: str = "text"
    access_log: bool = False
    service_name: str = "retd"
    traces_exporter: str = "none"
    metrics_exporter: str = "prometheus"
    otlp_endpoint: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens: Path | None = None
    reflection: bool = True
    max_batch_items: int = 1024
    max_stream_items: int = 100_000
    max_new_tokens_limit: int = 0
    max_concurrent_streams: int = 1000
    keepalive_min_ping_ms: int = 10_000
    ready_file: Path | None = None
    model_repo: Path | None = None
    repo_models: tuple[str, ...] = ()
    watch: float = 0.0
    unload_timeout: float = 60.0
    admin_tokens: Path | None = None
    decode_no_repeat_ngram_size: int = DecodeDefaults.no_repeat_ngram_size
    decode_repetition_penalty: float = DecodeDefaults.repetition_penalty
    decode_repetition_ngram_size: int = DecodeDefaults.repetition_ngram_size
    config_file: Path | None = field(default=None, compare=False)
    # The settings a flag, variable or the TOML file set (the others are their defaults).
    given: frozenset[str] = field(default=frozenset(), compare=False)

    def decode_defaults(self) -> DecodeDefaults:
        """The loop breakers a Decode request that sets none gets."""
        return DecodeDefaults(
            no_repeat_ngram_size=self.decode_no_repeat_ngram_size,
            repetition_penalty=self.decode_repetition_penalty,
            repetition_ngram_size=self.decode_repetition_ngram_size,
        )

    @property
    def message_limit(self) -> int:
        """The largest request (and response) message, in bytes."""
        return self.max_message_bytes or message_bytes_for(self.max_batch_items)

    def model_defaults(self) -> ModelSpec:
        """The per-model settings a model without its own gets (repository models)."""
        settings = {key: getattr(self, key) for key in PER_MODEL}
        return ModelSpec(name="", checkpoint=Path(), **settings)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _integer(name: str, minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if maximum is None and number < minimum:
            raise ConfigError(f"{name}: expected an integer >= {minimum}, got {number}")
        if maximum is not None and not minimum <= number <= maximum:
            note = f" (0: {ZERO_PORT[name]})" if name in ZERO_PORT else ""
            raise ConfigError(f"{name}: expected {minimum}..{maximum}{note}, got {number}")
        return number

    return parse


def _positive_int(name: str) -> Callable[[Any], int]:
    return _integer(name, 1)


def _non_negative_int(name: str) -> Callable[[Any], int]:
    return _integer(name, 0)


def _port(name: str) -> Callable[[Any], int]:
    return _integer(name, 0, 65535)


def _non_negative_float(name: str) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if not number >= 0:
            raise ConfigError(f"{name}: expected a number >= 0, got {value!r}")
        return number

    return parse


def _repetition_penalty(value: Any) -> float:
    name = "decode_repetition_penalty"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if not 1 <= number <= MAX_REPETITION_PENALTY:
        raise ConfigError(
            f"{name}: expected a number in [1, {MAX_REPETITION_PENALTY:g}] (1 = off), got {value!r}"
        )
    return number


def _choice(name: str, choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value)
        if text.upper() in choices:
            return text.upper()
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")

    return parse


def _one_of(name: str, choices: Sequence[str]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text in choices:
            return text
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")

    return parse


def _batching(value: Any) -> str:
    if value in ("continuous", "static"):
        return str(value)
    raise ConfigError(f"batching: expected 'continuous' or 'static', got {value!r}")


def _on_off(name: str) -> Callable[[Any], bool]:
    def parse(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("on", "true", "1", "yes"):
            return True
        if text in ("off", "false", "0", "no"):
            return False
        raise ConfigError(f"{name}: expected on or off, got {value!r}")

    return parse


def _names(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))


def _optional_path(value: Any) -> Path | None:
    return Path(value) if value not in (None, "") else None


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    help: str
    # Standard variables read after RETD_<NAME> (OpenTelemetry's OTEL_* ones).
    aliases: tuple[str, ...] = ()
    # The value of the flag given bare (`--watch`); None: the flag needs a value.
    const: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "RETD_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("host", str, "address to bind (default 127.0.0.1; use 0.0.0.0 for all interfaces)"),
    Setting(
        "port", _port("port"), f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)"
    ),
    Setting("device", str, "default device for models: auto (CUDA if present), cpu, cuda, cuda:N"),
    Setting("dtype", str, "default dtype for models: float32, bfloat16, float16 (CUDA only)"),
    Setting(
        "max_batch_size",
        _positive_int("max_batch_size"),
        "sequences one model decodes together: its KV-cache slots (default 32)",
    ),
    Setting(
        "max_queue_size",
        _positive_int("max_queue_size"),
        "sequences that may wait for a slot; beyond it calls get RESOURCE_EXHAUSTED (1024)",
    ),
    Setting(
        "max_wait_ms",
        _non_negative_float("max_wait_ms"),
        "with an idle model, wait up to this long for a fuller first batch (default 0)",
    ),
    Setting(
        "batching",
        _batching,
        "continuous (sequences join and leave at every step, the default) or static "
        "(request-level: a batch runs to its longest member's end)",
    ),
    Setting(
        "torch_threads",
        _non_negative_int("torch_threads"),
        "CPU threads for torch; 0 (default) = one less than the cores, at most 4, "
        "leaving a core to the event loop",
    ),
    Setting(
        "grace_period",
        _non_negative_float("grace_period"),
        "seconds in-flight calls get to finish on SIGTERM/SIGINT (default 10)",
    ),
    Setting(
        "max_message_bytes",
        _non_negative_int("max_message_bytes"),
        "largest request message accepted, in bytes; 0 (default): room for a DecodeBatch of "
        "twice --max-batch-items 768-dim float32 embeddings plus 1 MiB (8 MiB for 1024), so "
        "an over-long batch gets INVALID_ARGUMENT naming max_batch_items",
    ),
    Setting(
        "log_level",
        _choice("log_level", ("DEBUG", "INFO", "WARNING", "ERROR")),
        "DEBUG, INFO, WARNING or ERROR (default INFO)",
    ),
    Setting(
        "log_format",
        _one_of("log_format", ("text", "json")),
        "text or json (one object per line); lines carry the trace and span ids when tracing is on",
    ),
    Setting(
        "access_log",
        _on_off("access_log"),
        "on or off (default): an INFO line per call on the retd.access logger (method, "
        "status, latency, tokens, model)",
    ),
    Setting(
        "service_name",
        str,
        "service.name of traces and metrics (default retd)",
        ("OTEL_SERVICE_NAME",),
    ),
    Setting(
        "traces_exporter",
        _one_of("traces_exporter", ("otlp", "console", "none")),
        "where spans go: otlp, console or none (default; tracing off costs nothing)",
        ("OTEL_TRACES_EXPORTER",),
    ),
    Setting(
        "metrics_exporter",
        str,
        "prometheus (default), otlp, both comma-separated, or none",
        ("OTEL_METRICS_EXPORTER",),
    ),
    Setting(
        "otlp_endpoint",
        str,
        "OTLP/gRPC collector, e.g. http://127.0.0.1:4317 (the exporter's default otherwise)",
        ("OTEL_EXPORTER_OTLP_ENDPOINT",),
    ),
    Setting("metrics_host", str, "address of the Prometheus /metrics endpoint (127.0.0.1)"),
    Setting(
        "metrics_port",
        _port("metrics_port"),
        "port of the Prometheus /metrics endpoint; must be free when set (default 9464, or "
        "the next free port when another daemon holds it; 0 turns it off)",
    ),
    Setting("tls_cert", _optional_path, "PEM certificate (chain) for TLS on the port"),
    Setting("tls_key", _optional_path, "PEM private key of --tls-cert"),
    Setting(
        "tls_client_ca",
        _optional_path,
        "mutual TLS: clients must present a certificate this PEM CA signed",
    ),
    Setting(
        "auth_tokens",
        _optional_path,
        "file of accepted bearer tokens (one per line, or sha256:<hex>); reloaded on SIGHUP",
    ),
    Setting(
        "reflection",
        _on_off("reflection"),
        "on (default) or off: serve gRPC reflection (always open to all callers, like health)",
    ),
    Setting(
        "max_batch_items",
        _positive_int("max_batch_items"),
        "most embeddings in one DecodeBatch (default 1024)",
    ),
    Setting(
        "max_stream_items",
        _positive_int("max_stream_items"),
        "most items in one DecodeStream call (default 100000)",
    ),
    Setting(
        "max_new_tokens_limit",
        _non_negative_int("max_new_tokens_limit"),
        "most bytes a request may ask for; 0 (default) = each model's max_length",
    ),
    Setting(
        "max_concurrent_streams",
        _positive_int("max_concurrent_streams"),
        "calls one connection may have open at once (default 1000)",
    ),
    Setting(
        "keepalive_min_ping_ms",
        _positive_int("keepalive_min_ping_ms"),
        "clients pinging more often than this get GOAWAY (default 10000)",
    ),
    Setting(
        "decode_no_repeat_ngram_size",
        _integer("decode_no_repeat_ngram_size", 0, MAX_NGRAM_SIZE),
        "Decode's loop breaker when a request leaves no_repeat_ngram_size unset: never repeat "
        f"a byte n-gram of this size; 0 = off (default {DecodeDefaults.no_repeat_ngram_size})",
    ),
    Setting(
        "decode_repetition_penalty",
        _repetition_penalty,
        "Decode's repetition penalty when a request leaves repetition_penalty unset; 1 = off "
        f"(default {DecodeDefaults.repetition_penalty:g})",
    ),
    Setting(
        "decode_repetition_ngram_size",
        _integer("decode_repetition_ngram_size", 1, MAX_NGRAM_SIZE),
        "the n-gram size of Decode's default repetition penalty; 1 = every byte generated "
        f"(default {DecodeDefaults.repetition_ngram_size})",
    ),
    Setting(
        "default_model",
        str,
        "model that requests naming none are served by (default: the first generative model "
        "by name, else the first model by name)",
    ),
    Setting(
        "model_repo",
        _optional_path,
        "model repository DIR/<name>/<version>/: serve the newest version of its models",
    ),
    Setting(
        "repo_models",
        _names,
        "serve only these models of --model-repo (comma-separated; default: all)",
    ),
    Setting(
        "watch",
        _non_negative_float("watch"),
        "poll --model-repo every this many seconds (bare --watch: 2) and load new versions, "
        "hot; 0 (default) = never",
        const="2",
    ),
    Setting(
        "unload_timeout",
        _non_negative_float("unload_timeout"),
        "seconds a replaced or unloaded version waits for its calls before it is closed (60)",
    ),
    Setting(
        "admin_tokens",
        _optional_path,
        "bearer tokens for the ModelRepository admin service (default: --auth-tokens'); "
        "reloaded on SIGHUP",
    ),
    Setting(
        "ready_file",
        _optional_path,
        "write {address, port, pid} as JSON to this file once every model is serving",
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `retd serve`'s flags. Every default is None so that absent flags fall through
    to the environment and the TOML file."""
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file of settings and [[models]]"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        metavar="DIR",
        help="serve this checkpoint directory (model named after its card; env RETD_CHECKPOINT)",
    )
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME=DIR",
        dest="model_specs",
        help="serve checkpoint DIR as model NAME (repeatable; env RETD_MODELS, comma-separated)",
    )
    for setting in SETTINGS:
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            default=None,
            nargs=None if setting.const is None else "?",
            const=setting.const,
            help=f"{setting.help}; env {' or '.join((setting.env, *setting.aliases))}",
        )


def _models_from_toml(entries: Any, base: Path) -> list[tuple[ModelSpec, dict[str, Any]]]:
    """Each `[[models]]` table as a spec and the per-model settings it overrides."""
    if not isinstance(entries, list):
        raise ConfigError("models: expected an array of tables ([[models]])")
    specs = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"models[{index}]: expected a table")
        unknown = set(entry) - ({f.name for f in fields(ModelSpec)} - {"version"})
        if unknown:
            raise ConfigError(f"models[{index}]: unknown keys {sorted(unknown)}")
        if "name" not in entry or "checkpoint" not in entry:
            raise ConfigError(f"models[{index}]: needs both 'name' and 'checkpoint'")
        checkpoint = Path(entry["checkpoint"])
        spec = ModelSpec(
            name=str(entry["name"]),
            checkpoint=checkpoint if checkpoint.is_absolute() else base / checkpoint,
        )
        specs.append((spec, per_model_settings(entry, f"models[{index}]")))
    return specs


def per_model_settings(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The per-model settings (`PER_MODEL`) of `table`, parsed; errors name `where`."""
    parsers = {setting.name: setting.parse for setting in SETTINGS}
    settings: dict[str, Any] = {}
    for key in PER_MODEL:
        if key in table:
            try:
                settings[key] = parsers[key](table[key])
            except ConfigError as exc:
                raise ConfigError(f"{where}.{exc}") from None
    return settings


def model_settings_file(path: Path) -> dict[str, Any]:
    """A repository model's own settings (`MODEL_REPO/<name>/serving.toml`): any of the
    per-model settings, over the server-wide ones; {} when there is no such file."""
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = sorted(set(table) - set(PER_MODEL))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; expected some of {list(PER_MODEL)}")
    return per_model_settings(table, str(path))


def _parse_model_pairs(pairs: Sequence[str], source: str) -> list[ModelSpec]:
    specs = []
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{source}: expected NAME=DIR, got {pair!r}")
        specs.append(ModelSpec(name=name.strip(), checkpoint=Path(path.strip())))
    return specs


def _model_name_for(checkpoint: Path) -> str:
    """A checkpoint served without a name is named after its card (else its directory)."""
    import json

    try:
        card = json.loads((checkpoint / "card.json").read_text())
        return str(card.get("name") or card.get("architecture") or checkpoint.name)
    except (OSError, ValueError):
        return checkpoint.name


def load_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Merge parsed CLI flags over `RETD_*` variables over the TOML file over defaults."""
    environ = os.environ if environ is None else environ
    config_file = args.config or _optional_path(environ.get("RETD_CONFIG"))
    from_toml: dict[str, Any] = {}
    toml_models: list[tuple[ModelSpec, dict[str, Any]]] = []
    if config_file is not None:
        try:
            from_toml = tomllib.loads(Path(config_file).read_text())
        except OSError as exc:
            raise ConfigError(f"config: cannot read {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {config_file} is not valid TOML: {exc}") from None
        toml_models = _models_from_toml(
            from_toml.pop("models", []), Path(config_file).resolve().parent
        )
        unknown = set(from_toml) - {s.name for s in SETTINGS}
        if unknown:
            raise ConfigError(f"config: unknown keys {sorted(unknown)} in {config_file}")

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

    # Models: the CLI's, else the environment's, else the TOML file's.
    models: list[tuple[ModelSpec, dict[str, Any]]] = []
    if args.checkpoint is not None or args.model_specs:
        if args.checkpoint is not None:
            models.append((ModelSpec(_model_name_for(args.checkpoint), args.checkpoint), {}))
        models += [(s, {}) for s in _parse_model_pairs(args.model_specs or [], "--model")]
    elif environ.get("RETD_CHECKPOINT") or environ.get("RETD_MODELS"):
        if environ.get("RETD_CHECKPOINT"):
            checkpoint = Path(environ["RETD_CHECKPOINT"])
            models.append((ModelSpec(_model_name_for(checkpoint), checkpoint), {}))
        if environ.get("RETD_MODELS"):
            pairs = [p for p in environ["RETD_MODELS"].split(",") if p.strip()]
            models += [(s, {}) for s in _parse_model_pairs(pairs, "RETD_MODELS")]
    else:
        models = toml_models
    if not models and values.get("model_repo") is None:
        from retd.model.checkpoint import DEFAULT_CHECKPOINT

        if (DEFAULT_CHECKPOINT / "card.json").is_file():
            models = [(ModelSpec(_model_name_for(DEFAULT_CHECKPOINT), DEFAULT_CHECKPOINT), {})]
    repository = values.get("model_repo")
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

    base = ServerConfig()
    server_wide = {key: values.get(key, getattr(base, key)) for key in PER_MODEL}
    resolved = [replace(spec, **{**server_wide, **overrides}) for spec, overrides in models]
    names = [spec.name for spec in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"models: names must be unique, repeated: {duplicates}")
    # An empty default is settled once the models are loaded (ModelRegistry.start: the first
    # generative one by name); with a repository, a named one need not be among `names`.
    given = frozenset(values)
    default_model = values.pop("default_model", "")
    if default_model and default_model not in names and repository is None:
        raise ConfigError(f"default_model: {default_model!r} is not among the models {names}")
    return ServerConfig(
        **values,
        models=tuple(resolved),
        default_model=default_model,
        config_file=Path(config_file) if config_file else None,
        given=given,
    )
