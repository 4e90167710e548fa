"""Every setting the server takes, declared once in `SETTINGS`: its name gives its CLI flag
(`--grace-period`), environment variable (`RETD_GRACE_PERIOD`) and TOML key
(`grace_period`); `at` is the field of `ServerConfig` it sets (schema.py), whose default is
its default (a help text's `{default}`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retd.server.config.parsers import (
    as_given,
    choice,
    cpus_setting,
    integer,
    names,
    non_negative_float,
    non_negative_int,
    number_in,
    on_off,
    one_of,
    optional_path,
    port,
    positive_float,
    positive_int,
)
from retd.server.config.schema import (
    MAX_EOS_BIAS,
    MAX_NGRAM_SIZE,
    MAX_REPETITION_PENALTY,
    ServerConfig,
)

# Where the per-model settings live in ServerConfig (and, below it, in ModelSettings).
MODEL_DEFAULTS = "model_defaults."


def field_at(config: Any, path: str) -> Any:
    """The value of the (dotted) field `path` of `config`."""
    for name in path.split("."):
        config = getattr(config, name)
    return config


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    help: str
    # Standard variables read after RETD_<NAME> (OpenTelemetry's OTEL_* ones).
    aliases: tuple[str, ...] = ()
    # The value of the flag given bare (`--watch`); None: the flag needs a value.
    const: str | None = None
    # The field of ServerConfig it sets, dotted; "": the field of its name.
    at: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "RETD_" + self.name.upper()

    @property
    def field(self) -> str:
        return self.at or self.name

    @property
    def per_model(self) -> bool:
        """A model's own table may set it (`[[models]]`, serving.toml)."""
        return self.field.startswith(MODEL_DEFAULTS)

    @property
    def default(self) -> Any:
        return field_at(ServerConfig(), self.field)

    def describe(self) -> str:
        """Its help, `{default}` filled in."""
        default = self.default
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        return self.help.replace("{default}", shown)


SETTINGS: tuple[Setting, ...] = (
    Setting("host", str, "address to bind (default {default}; use 0.0.0.0 for all interfaces)"),
    Setting("port", port("port"), "port to listen on (default {default}; 0 picks a free one)"),
    Setting(
        "device",
        str,
        "default device for models: auto (CUDA if present), cpu, cuda, cuda:N",
        at="model_defaults.device",
    ),
    Setting(
        "dtype",
        str,
        "default dtype for models: float32, bfloat16, float16 (CUDA only)",
        at="model_defaults.dtype",
    ),
    Setting(
        "max_batch_size",
        positive_int("max_batch_size"),
        "sequences one model decodes together: its KV-cache slots (default {default})",
        at="model_defaults.scheduler.max_batch_size",
    ),
    Setting(
        "max_queue_size",
        positive_int("max_queue_size"),
        "sequences that may wait for a slot; beyond it calls get RESOURCE_EXHAUSTED ({default})",
        at="model_defaults.scheduler.max_queue_size",
    ),
    Setting(
        "max_wait_ms",
        non_negative_float("max_wait_ms"),
        "with an idle model, wait up to this long for a fuller first batch (default {default})",
        at="model_defaults.scheduler.max_wait_ms",
    ),
    Setting(
        "batching",
        as_given,
        "continuous (sequences join and leave at every step, the default) or static "
        "(request-level: a batch runs to its longest member's end)",
        at="model_defaults.scheduler.batching",
    ),
    Setting(
        "steps_per_call",
        positive_int("steps_per_call"),
        "the most decode steps a batch runs in one call of the C++ step before the scheduler "
        "decides again; joiners, cancellations and deadlines wait up to that many steps "
        "(default {default}; 1: decide before every step)",
        at="model_defaults.scheduler.steps_per_call",
    ),
    Setting(
        "engine",
        as_given,
        "where a RET model's scheduler and decode steps run: thread (default: a thread of "
        "the server's process) or process (a process of its own, out of the way of the "
        "event loop's GIL)",
        at="model_defaults.engine",
    ),
    Setting(
        "step_impl",
        as_given,
        "how a RET model's decode steps run: auto (default: one C++ call a step when its "
        "extension builds here, else eager), cpp (the C++ step or fail), eager (PyTorch op by "
        "op); greedy outputs are the same either way",
        at="model_defaults.step_impl",
    ),
    Setting(
        "draft_tokens",
        non_negative_int("draft_tokens"),
        "speculative decoding of greedy rows (C++ prefix step): up to this many tokens a step "
        "guessed from the row's own earlier text and checked in the same forward pass; the "
        "same tokens either way (default {default}; 0: off)",
        at="model_defaults.draft_tokens",
    ),
    Setting(
        "draft_ngram",
        positive_int("draft_ngram"),
        "the n of --draft-tokens' guesses: where the row's last n tokens occurred before, what "
        "followed them is the guess (default {default})",
        at="model_defaults.draft_ngram",
    ),
    Setting(
        "torch_threads",
        non_negative_int("torch_threads"),
        "CPU threads for torch; 0 (default) = one less than the cores, at most 4, "
        "leaving a core to the event loop",
    ),
    Setting(
        "worker_cpus",
        cpus_setting("worker_cpus"),
        "where models' decode workers run: auto (default: the last --torch-threads CPUs, "
        "the rest of the daemon on the others, when at least one is left), none (unpinned), "
        "or a CPU list such as 1, 2-3 or 0,2",
    ),
    Setting(
        "switch_interval_ms",
        positive_float("switch_interval_ms"),
        "how long a thread may keep the GIL while another waits for it (Python's "
        "sys.setswitchinterval, 5 ms by default): how long a model's decode worker may wait "
        "for the event loop's thread after each call of the model (default {default})",
    ),
    Setting(
        "grace_period",
        non_negative_float("grace_period"),
        "seconds in-flight calls get to finish on SIGTERM/SIGINT (default {default})",
    ),
    Setting(
        "max_message_bytes",
        non_negative_int("max_message_bytes"),
        "largest request message accepted, in bytes; 0 (default): room for a DecodeBatch of "
        "twice --max-batch-items 768-dim float32 embeddings plus 1 MiB (8 MiB for 1024), so "
        "an over-long batch gets INVALID_ARGUMENT naming max_batch_items",
    ),
    Setting(
        "log_level",
        choice("log_level", ("DEBUG", "INFO", "WARNING", "ERROR")),
        "DEBUG, INFO, WARNING or ERROR (default {default})",
    ),
    Setting(
        "log_format",
        one_of("log_format", ("text", "json")),
        "text or json (one object per line); lines carry the trace and span ids when tracing is on",
    ),
    Setting(
        "access_log",
        on_off("access_log"),
        "on or off (default): an INFO line per call on the retd.access logger (method, "
        "status, latency, tokens, model)",
    ),
    Setting(
        "service_name",
        str,
        "service.name of traces and metrics (default {default})",
        ("OTEL_SERVICE_NAME",),
        at="telemetry.service_name",
    ),
    Setting(
        "traces_exporter",
        one_of("traces_exporter", ("otlp", "console", "none")),
        "where spans go: otlp, console or none (default; tracing off costs nothing)",
        ("OTEL_TRACES_EXPORTER",),
        at="telemetry.traces_exporter",
    ),
    Setting(
        "metrics_exporter",
        str,
        "{default} (default), otlp, both comma-separated, or none",
        ("OTEL_METRICS_EXPORTER",),
        at="telemetry.metrics_exporter",
    ),
    Setting(
        "otlp_endpoint",
        str,
        "OTLP/gRPC collector, e.g. http://127.0.0.1:4317 (the exporter's default otherwise)",
        ("OTEL_EXPORTER_OTLP_ENDPOINT",),
        at="telemetry.otlp_endpoint",
    ),
    Setting(
        "metrics_host",
        str,
        "address of the Prometheus /metrics endpoint ({default})",
        at="telemetry.metrics_host",
    ),
    Setting(
        "metrics_port",
        port("metrics_port"),
        "port of the Prometheus /metrics endpoint; must be free when set (default {default}, "
        "or the next free port when another daemon holds it; 0 turns it off)",
        at="telemetry.metrics_port",
    ),
    Setting("tls_cert", optional_path, "PEM certificate (chain) for TLS on the port"),
    Setting("tls_key", optional_path, "PEM private key of --tls-cert"),
    Setting(
        "tls_client_ca",
        optional_path,
        "mutual TLS: clients must present a certificate this PEM CA signed",
    ),
    Setting(
        "auth_tokens",
        optional_path,
        "file of accepted bearer tokens (one per line, or sha256:<hex>); reloaded on SIGHUP",
    ),
    Setting(
        "reflection",
        on_off("reflection"),
        "on (default) or off: serve gRPC reflection (always open to all callers, like health)",
    ),
    Setting(
        "max_batch_items",
        positive_int("max_batch_items"),
        "most embeddings in one DecodeBatch (default {default})",
        at="limits.max_batch_items",
    ),
    Setting(
        "max_stream_items",
        positive_int("max_stream_items"),
        "most items in one DecodeStream call (default {default})",
        at="limits.max_stream_items",
    ),
    Setting(
        "max_new_tokens_limit",
        non_negative_int("max_new_tokens_limit"),
        "most bytes a request may ask for; 0 (default) = each model's max_length",
        at="limits.max_new_tokens_limit",
    ),
    Setting(
        "max_concurrent_streams",
        positive_int("max_concurrent_streams"),
        "calls one connection may have open at once (default {default})",
    ),
    Setting(
        "keepalive_min_ping_ms",
        positive_int("keepalive_min_ping_ms"),
        "clients pinging more often than this get GOAWAY (default {default})",
    ),
    Setting(
        "decode_no_repeat_ngram_size",
        integer("decode_no_repeat_ngram_size", 0, MAX_NGRAM_SIZE),
        "Decode's loop breaker when a request leaves no_repeat_ngram_size unset: never repeat "
        "a byte n-gram of this size; 0 = off (default {default})",
        at="decode_defaults.no_repeat_ngram_size",
    ),
    Setting(
        "decode_repetition_penalty",
        number_in("decode_repetition_penalty", 1, MAX_REPETITION_PENALTY, off=1),
        "Decode's repetition penalty when a request leaves repetition_penalty unset; 1 = off "
        "(default {default})",
        at="decode_defaults.repetition_penalty",
    ),
    Setting(
        "decode_repetition_ngram_size",
        integer("decode_repetition_ngram_size", 1, MAX_NGRAM_SIZE),
        "the n-gram size of Decode's default repetition penalty; 1 = every byte generated "
        "(default {default})",
        at="decode_defaults.repetition_ngram_size",
    ),
    Setting(
        "decode_eos_bias",
        number_in("decode_eos_bias", -MAX_EOS_BIAS, MAX_EOS_BIAS, off=0),
        "Decode's bias on the end-of-sequence token's logit when a request leaves eos_bias "
        "unset; < 0 lengthens answers, 0 = off (default {default})",
        at="decode_defaults.eos_bias",
    ),
    Setting(
        "default_model",
        str,
        "model that requests naming none are served by (default: the first generative model "
        "by name, else the first model by name)",
    ),
    Setting(
        "model_repo",
        optional_path,
        "model repository DIR/<name>/<version>/: serve the newest version of its models",
        at="repository.path",
    ),
    Setting(
        "repo_models",
        names,
        "serve only these models of --model-repo (comma-separated; default: all)",
        at="repository.models",
    ),
    Setting(
        "watch",
        non_negative_float("watch"),
        "poll --model-repo every this many seconds (bare --watch: 2) and load new versions, "
        "hot; 0 (default) = never",
        const="2",
        at="repository.watch",
    ),
    Setting(
        "unload_timeout",
        non_negative_float("unload_timeout"),
        "seconds a replaced or unloaded version waits for its calls before it is closed "
        "({default})",
        at="repository.unload_timeout",
    ),
    Setting(
        "admin_tokens",
        optional_path,
        "bearer tokens for the ModelRepository admin service (default: --auth-tokens'); "
        "reloaded on SIGHUP",
    ),
    Setting(
        "ready_file",
        optional_path,
        "write {address, port, pid} as JSON to this file once every model is serving",
    ),
)

# Settings a [[models]] table or a serving.toml may override for its model.
PER_MODEL = tuple(setting.name for setting in SETTINGS if setting.per_model)


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
            help=f"{setting.describe()}; env {' or '.join((setting.env, *setting.aliases))}",
        )
