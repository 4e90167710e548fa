"""Server configuration: frozen dataclasses built from CLI flags, `RETD_*` environment
variables and an optional TOML file, in that order of precedence.

- schema.py: `ServerConfig` and the parts it nests (a model's settings and scheduler, the
  per-call limits, telemetry, the model repository), every default declared once;
- settings.py: `SETTINGS`, each setting's flag, variable and TOML key, parser (parsers.py),
  help, and the field it sets;
- loader.py: `load_config`, which merges them (and a repository model's serving.toml).
"""

from retd.model.defaults import DecodeDefaults
from retd.server.config.loader import load_config, model_settings_file
from retd.server.config.schema import (
    BATCH_ITEM_WIRE_BYTES,
    DEFAULT_PORT,
    EMBEDDING_DIM,
    MAX_EOS_BIAS,
    MAX_NGRAM_SIZE,
    MAX_REPETITION_PENALTY,
    ConfigError,
    MiB,
    ModelSettings,
    ModelSpec,
    RepositoryConfig,
    SchedulerConfig,
    ServerConfig,
    ServiceLimits,
    TelemetryConfig,
    message_bytes_for,
)
from retd.server.config.settings import PER_MODEL, SETTINGS, Setting, add_arguments

__all__ = [
    "BATCH_ITEM_WIRE_BYTES",
    "DEFAULT_PORT",
    "EMBEDDING_DIM",
    "MAX_NGRAM_SIZE",
    "MAX_EOS_BIAS",
    "MAX_REPETITION_PENALTY",
    "PER_MODEL",
    "SETTINGS",
    "ConfigError",
    "DecodeDefaults",
    "MiB",
    "ModelSettings",
    "ModelSpec",
    "RepositoryConfig",
    "SchedulerConfig",
    "ServerConfig",
    "ServiceLimits",
    "Setting",
    "TelemetryConfig",
    "add_arguments",
    "load_config",
    "model_settings_file",
    "message_bytes_for",
]
