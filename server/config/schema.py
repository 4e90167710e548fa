"""What the server is configured with: frozen dataclasses, one for each part of the server
a setting feeds (a model's scheduler, the per-call limits, telemetry, the model repository),
nested in `ServerConfig`. Every default is declared here, once: the settings table
(settings.py) and the loader (loader.py) read them from these fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Decode's default loop breakers are declared with the model (`retd eval` measures them too).
from retd.model.defaults import BOUNDS, STEP_IMPLS, DecodeDefaults

DEFAULT_PORT = 50051
MiB = 1024 * 1024

# What one DecodeBatch item takes on the wire: a sentence embedding of the encoder's 768
# float32 values, raw or as a packed float list, and its framing (field tags, lengths, the
# raw shape: 13 bytes; tests/server/test_message_limits.py measures it).
EMBEDDING_DIM = 768
BATCH_ITEM_WIRE_BYTES = EMBEDDING_DIM * 4 + 16

# Bounds of the loop breakers and the EOS bias, for the settings and for requests
# (server/validation.py): those of DecodeDefaults, which a card's recommendation obeys too.
MAX_NGRAM_SIZE = int(BOUNDS["no_repeat_ngram_size"][1])  # bytes; no answer is longer
MAX_REPETITION_PENALTY = BOUNDS["repetition_penalty"][1]
MAX_EOS_BIAS = BOUNDS["eos_bias"][1]  # |eos_bias| at most this

BATCHING = ("continuous", "static")
ENGINES = ("thread", "process")


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the setting."""


def message_bytes_for(max_batch_items: int) -> int:
    """The request size limit that agrees with `max_batch_items`: room for a DecodeBatch of
    twice that many embeddings and 1 MiB of other fields, in whole MiB (8 MiB for 1024), so
    that a batch over the item limit gets INVALID_ARGUMENT naming that limit rather than
    RESOURCE_EXHAUSTED from the transport."""
    needed = 2 * max_batch_items * BATCH_ITEM_WIRE_BYTES + MiB
    return -(-needed // MiB) * MiB


@dataclass(frozen=True)
class SchedulerConfig:
    """One model's scheduler (server/scheduler.py)."""

    max_batch_size: int = 32  # KV-cache slots: sequences decoded together
    max_queue_size: int = 1024  # sequences waiting for a slot
    max_wait_ms: float = 0.0  # with an idle model, wait this long for a fuller first batch
    # continuous: sequences join and leave at every step; static: request-level batching.
    batching: str = "continuous"
    # The most decode steps the worker runs in one call of the C++ step before the scheduler
    # decides again (multi-step scheduling): joiners, cancellations and deadlines wait up to
    # this many steps; 1: decide before every step.
    steps_per_call: int = 4

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size: expected >= 1, got {self.max_batch_size}")
        if self.steps_per_call < 1:
            raise ConfigError(f"steps_per_call: expected >= 1, got {self.steps_per_call}")
        if self.max_queue_size < 0:
            raise ConfigError(f"max_queue_size: expected >= 0, got {self.max_queue_size}")
        if not self.max_wait_ms >= 0:
            raise ConfigError(f"max_wait_ms: expected >= 0, got {self.max_wait_ms}")
        if self.batching not in BATCHING:
            raise ConfigError(f"batching: expected 'continuous' or 'static', got {self.batching!r}")


@dataclass(frozen=True)
class ModelSettings:
    """What a model is loaded and scheduled with: the server-wide settings, which a
    `[[models]]` table or a repository model's serving.toml may override for its model."""

    device: str = "auto"
    dtype: str = "float32"
    scheduler: SchedulerConfig = SchedulerConfig()
    # Where a RET model's scheduler and worker run: a thread of the server's process, or a
    # process of their own (server/engine_process.py). Phrase banks always run in a thread.
    engine: str = "thread"
    # How a RET model's decode steps run (model/cpp_step.py): auto, cpp or eager.
    step_impl: str = "auto"
    # Speculative decoding of greedy rows with the C++ prefix step: up to this many tokens
    # guessed a step from the row's own earlier text (its last draft_ngram tokens); 0: off.
    draft_tokens: int = 2
    draft_ngram: int = 3

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: expected 'thread' or 'process', got {self.engine!r}")
        if self.draft_tokens < 0:
            raise ConfigError(f"draft_tokens: expected >= 0, got {self.draft_tokens}")
        if self.draft_ngram < 1:
            raise ConfigError(f"draft_ngram: expected >= 1, got {self.draft_ngram}")
        if self.step_impl not in STEP_IMPLS:
            raise ConfigError(
                f"step_impl: expected one of {', '.join(STEP_IMPLS)}, got {self.step_impl!r}"
            )


@dataclass(frozen=True)
class ModelSpec:
    """One model to load: a checkpoint directory served under `name`."""

    name: str
    checkpoint: Path
    settings: ModelSettings = ModelSettings()
    # Its version: the directory name in a model repository, 1 for a checkpoint named directly.
    version: int = 1


@dataclass(frozen=True)
class ServiceLimits:
    """Per-call limits that protect the process (0 = no server-wide cap)."""

    max_batch_items: int = 1024
    max_stream_items: int = 100_000
    max_new_tokens_limit: int = 0  # 0: each model's max_length


@dataclass(frozen=True)
class TelemetryConfig:
    service_name: str = "retd"
    traces_exporter: str = "none"  # otlp, console, none
    metrics_exporter: str = "prometheus"  # prometheus, otlp, none (comma-separated)
    otlp_endpoint: str | None = None  # else OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4317
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464  # 0 turns the Prometheus endpoint off
    # Set explicitly (must be free), or the default (the next free port serves when taken).
    metrics_port_given: bool = False


@dataclass(frozen=True)
class RepositoryConfig:
    """The model repository (server/repository.py): its directory, the models of it to
    serve, how often to poll it, and how long a released version waits for its calls."""

    path: Path | None = None
    models: tuple[str, ...] = ()  # empty: all of them
    watch: float = 0.0  # seconds between polls; 0: never
    # Also for versions of models named directly (replaced by the admin service, or closed
    # at shutdown): the one drain timeout of the registry.
    unload_timeout: float = 60.0


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    models: tuple[ModelSpec, ...] = ()
    default_model: str = ""
    # The per-model settings every model gets unless its own table says otherwise.
    model_defaults: ModelSettings = ModelSettings()
    torch_threads: int = 0
    worker_cpus: str = "auto"  # auto, none or a CPU list (server/placement.py)
    switch_interval_ms: float = 0.2
    grace_period: float = 10.0
    max_message_bytes: int = 0  # 0: message_bytes_for(max_batch_items); see message_limit
    max_concurrent_streams: int = 1000
    keepalive_min_ping_ms: int = 10_000
    log_level: str = "INFO"
    log_format: str = "text"
    access_log: bool = False
    telemetry: TelemetryConfig = TelemetryConfig()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    auth_tokens: Path | None = None
    admin_tokens: Path | None = None
    reflection: bool = True
    limits: ServiceLimits = ServiceLimits()
    # The loop breakers a Decode request that sets none gets.
    decode_defaults: DecodeDefaults = DecodeDefaults()
    repository: RepositoryConfig = RepositoryConfig()
    ready_file: Path | None = None
    config_file: Path | None = field(default=None, compare=False)
    # The settings a flag, variable or the TOML file set (the others are their defaults).
    given: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def message_limit(self) -> int:
        """The largest request (and response) message, in bytes."""
        return self.max_message_bytes or message_bytes_for(self.limits.max_batch_items)

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"
