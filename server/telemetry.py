"""Telemetry: an OpenTelemetry span per call (and per batch or stream item), the metrics
every model server exposes, and structured access logs that carry the trace ids.

Configured by OpenTelemetry's standard environment (`OTEL_SERVICE_NAME`,
`OTEL_TRACES_EXPORTER`, `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_SAMPLER[_ARG]`, ...), with
CLI flags for the common ones. With tracing off the tracer is OpenTelemetry's no-op one and
no attribute is computed: telemetry off costs nothing. Every span attribute is set here
(the calls' interceptor, server/interceptor.py, opens the call's span; the servicer its
items' spans); what it reads of models and sequences is typed structurally
(server/observed.py), so it imports neither the engine nor torch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import TypeVar, cast

import grpc
from opentelemetry import context as context_api
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from retd.server import heap
from retd.server.config import TelemetryConfig
from retd.server.logs import access_log, hex_id
from retd.server.metrics_endpoint import start_metrics_endpoint
from retd.server.observed import (
    ObservedEngine,
    Outcome,
    Params,
    SequenceFacts,
    ServedVersion,
)
from retd.server.span_export import ProcessSpanExporter
from retd.server.span_facts import Facts, annotate
from retd.server.span_records import RecordingTracerProvider

# Histogram buckets for latencies, in seconds (the SDK's defaults suit milliseconds).
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


@dataclass
class CallTally:
    """What one call's sequences added up to, for its access-log line."""

    tokens: int = 0
    models: set[str] = field(default_factory=set)


E = TypeVar("E", bound=ObservedEngine)

_current_call: ContextVar[CallTally | None] = ContextVar("retd_call", default=None)

# Monotonic seconds -> wall-clock nanoseconds, for span events stamped after the fact.
_WALL_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def wall_ns(monotonic_s: float) -> int:
    return int(monotonic_s * 1e9) + _WALL_OFFSET_NS


def _span_exporter(config: TelemetryConfig) -> SpanExporter | None:
    kind = config.traces_exporter.strip().lower()
    if kind in ("", "none"):
        return None
    if kind == "console":
        return ConsoleSpanExporter()
    if kind == "otlp":  # OpenTelemetry's OTLP exporter, in a process of its own
        endpoint = config.otlp_endpoint
        insecure = endpoint is None or not endpoint.startswith("https://")
        return ProcessSpanExporter(endpoint=endpoint, insecure=insecure)
    raise ValueError(f"traces exporter: expected otlp, console or none, got {kind!r}")


def _metric_readers(config: TelemetryConfig) -> tuple[list[MetricReader], int]:
    """The readers, and the port /metrics listens on (0: none)."""
    readers: list[MetricReader] = []
    metrics_port = 0
    for kind in {k.strip().lower() for k in config.metrics_exporter.split(",")} - {"", "none"}:
        if kind == "prometheus":
            if config.metrics_port:
                from opentelemetry.exporter.prometheus import PrometheusMetricReader

                metrics_port = start_metrics_endpoint(
                    config.metrics_host, config.metrics_port, port_given=config.metrics_port_given
                )
                readers.append(PrometheusMetricReader())
        elif kind == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )

            endpoint = config.otlp_endpoint
            insecure = endpoint is None or not endpoint.startswith("https://")
            exporter = OTLPMetricExporter(endpoint=endpoint, insecure=insecure)
            readers.append(PeriodicExportingMetricReader(exporter))
        else:
            raise ValueError(f"metrics exporter: expected prometheus, otlp or none, got {kind!r}")
    return readers, metrics_port


class Telemetry:
    """The tracer, the meter's instruments, and what records one call into them."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer_provider = tracer_provider
        self.metrics_port = 0  # where /metrics listens (from_config's); 0: nowhere
        self._meter_provider = meter_provider
        self.tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer("retd.server")
        meter = (meter_provider or metrics.NoOpMeterProvider()).get_meter("retd.server")
        self.request_duration = meter.create_histogram(
            "retd.request.duration",
            unit="s",
            description="Duration of calls, by method and status",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self.queue_duration = meter.create_histogram(
            "retd.queue.duration",
            unit="s",
            description="Time sequences waited for a slot",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self.time_to_first_token = meter.create_histogram(
            "retd.time_to_first_token",
            unit="s",
            description="From arrival to the first byte",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self.tokens_generated = meter.create_counter(
            "retd.tokens.generated", unit="{token}", description="Bytes generated"
        )
        self.requests = meter.create_counter(
            "retd.requests", unit="{request}", description="Calls, by method and status"
        )
        self._meter = meter
        self._stop_timing: Callable[[], None] | None = None

    @classmethod
    def from_config(cls, config: TelemetryConfig) -> Telemetry:
        resource = Resource.create({"service.name": config.service_name})
        exporter = _span_exporter(config)
        tracer_provider: trace.TracerProvider | None = None
        if exporter is not None:
            sdk = TracerProvider(resource=resource)  # sampler from OTEL_TRACES_SAMPLER
            processor = BatchSpanProcessor(exporter)
            sdk.add_span_processor(processor)
            tracer_provider = sdk
            if isinstance(exporter, ProcessSpanExporter):  # spans as its records from the start
                tracer_provider = RecordingTracerProvider(sdk, processor)
        readers, metrics_port = _metric_readers(config)
        meter_provider = (
            MeterProvider(resource=resource, metric_readers=readers) if readers else None
        )
        telemetry = cls(tracer_provider, meter_provider)
        telemetry.metrics_port = metrics_port
        return telemetry

    def observe(
        self,
        engines: Callable[[], Iterable[E]],
        in_flight: Callable[[], int],
        device_memory: Callable[[E], int | None],
        rss: Callable[[], int | None],
    ) -> None:
        """Gauges read when the metrics are collected: queue depth, running batch, calls in
        flight, memory. `engines()`: the engines loaded then (versions come and go); the
        figures of several versions of one model are summed. `device_memory(engine)`: the
        bytes allocated on its device (None on the CPU); `rss()`: the daemon's (its engine
        processes included)."""

        def per_model(
            read: Callable[[E], int],
        ) -> Callable[..., Iterable[Observation]]:
            def callback(options: CallbackOptions) -> Iterable[Observation]:
                totals: dict[str, int] = {}
                for engine in engines():
                    totals[engine.name] = totals.get(engine.name, 0) + read(engine)
                return [Observation(v, {"retd.model": n}) for n, v in totals.items()]

            return callback

        def memory(options: CallbackOptions) -> Iterable[Observation]:
            totals: dict[str, int] = {}
            for engine in engines():
                allocated = device_memory(engine)
                if allocated is not None:
                    totals[engine.name] = totals.get(engine.name, 0) + allocated
            return [Observation(v, {"retd.model": n}) for n, v in totals.items()]

        def resident(options: CallbackOptions) -> Iterable[Observation]:
            rss_bytes = rss()
            return [Observation(rss_bytes)] if rss_bytes is not None else []

        meter = self._meter
        meter.create_observable_gauge(
            "retd.queue.depth", [per_model(lambda e: e.stats().waiting)], unit="{sequence}",
            description="Sequences waiting for a slot",
        )  # fmt: skip
        meter.create_observable_gauge(
            "retd.batch.running", [per_model(lambda e: e.stats().running)], unit="{sequence}",
            description="Sequences in the running batch",
        )  # fmt: skip
        meter.create_observable_gauge(
            "retd.requests.in_flight", [lambda options: [Observation(in_flight())]],
            unit="{request}", description="Calls being served",
        )  # fmt: skip
        meter.create_observable_gauge(
            "retd.process.memory.rss",
            [resident],
            unit="By",
            description="Resident memory of the daemon and its engine processes",
        )
        meter.create_observable_gauge(
            "retd.device.memory.allocated", [memory], unit="By",
            description="CUDA memory allocated by the model's device",
        )  # fmt: skip
        if self._meter_provider is not None:  # metrics on: the collector's pauses too
            self._stop_timing = heap.observe_collections(meter)

    def shutdown(self) -> None:
        if self._stop_timing is not None:
            self._stop_timing()
            self._stop_timing = None
        for provider in (self._tracer_provider, self._meter_provider):
            shutdown = getattr(provider, "shutdown", None)
            if shutdown is not None:
                shutdown()

    # ---- one call ----------------------------------------------------------------------

    def start_rpc(
        self,
        service: str,
        method: str,
        context: grpc.aio.ServicerContext,
        server_address: str,
        server_port: int,
    ) -> tuple[Span, Token[context_api.Context]]:
        """The server span of one call, continuing the caller's trace (W3C traceparent),
        made the current span; returns it and the token `end_rpc` takes. (What
        `start_as_current_span` does, without its two generator context managers: a call's
        span is made at ~1,400 calls/s on the event loop's thread.)"""
        carrier = {key: value for key, value in (context.invocation_metadata() or ())}
        parent = propagate.extract(carrier)
        _current_call.set(CallTally())
        span = self.tracer.start_span(f"{service}/{method}", context=parent, kind=SpanKind.SERVER)
        if span.is_recording():
            span.set_attributes(
                {
                    "rpc.system": "grpc",
                    "rpc.service": service,
                    "rpc.method": method,
                    "server.address": server_address,
                    "server.port": server_port,
                }
            )
        return span, context_api.attach(trace.set_span_in_context(span))

    @staticmethod
    def end_rpc(span: Span, token: Token[context_api.Context]) -> None:
        """The call's span is no longer the current one, and ends (after `finish_rpc`)."""
        context_api.detach(token)
        span.end()

    def finish_rpc(
        self, span: Span, method: str, code: grpc.StatusCode, details: str, seconds: float
    ) -> None:
        attributes = {"rpc.method": method, "rpc.grpc.status_code": code.value[0]}
        self.request_duration.record(seconds, attributes)
        self.requests.add(1, attributes)
        tally = _current_call.get() or CallTally()
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
        if not access_log.isEnabledFor(logging.INFO):  # --access-log off (the default)
            return
        span_context = span.get_span_context()
        model = ",".join(sorted(tally.models))
        access_log.info(
            "%s %s %.1fms %d tokens%s",
            method,
            code.name,
            seconds * 1e3,
            tally.tokens,
            f" {model}" if model else "",
            extra={
                "rpc_method": method,
                "status": code.name,
                "latency_ms": round(seconds * 1e3, 3),
                "tokens": tally.tokens,
                "model": model,
                "trace_id": hex_id(span_context.trace_id, 32),
                "span_id": hex_id(span_context.span_id, 16),
            },
        )

    @contextlib.contextmanager
    def item_span(self, name: str, index: str) -> Iterator[Span]:
        """A span for one item of a DecodeBatch or DecodeStream, a child of the call's span
        and linked to it."""
        parent = trace.get_current_span()
        links = [Link(parent.get_span_context())] if parent.is_recording() else []
        with self.tracer.start_as_current_span(
            name, links=links, record_exception=False, set_status_on_exception=False
        ) as span:
            if span.is_recording():
                span.set_attribute("retd.item", index)
            yield span

    @staticmethod
    def item_failed(span: Span, code_name: str, message: str) -> None:
        """An item of a batch or stream got an error (its call goes on)."""
        if span.is_recording():
            span.set_status(Status(StatusCode.ERROR, f"{code_name}: {message}"))

    def record_sequence(
        self, served: ServedVersion, request: SequenceFacts, result: Outcome
    ) -> None:
        """A finished sequence: metrics, and the current span's (the call's, or its
        item's) attributes and stage events."""
        engine = served.ready_engine
        tally = _current_call.get()
        if tally is not None:
            tally.tokens += len(result.token_ids)
            tally.models.add(engine.name)
        model = {"retd.model": engine.name}
        self.queue_duration.record(result.queue_s, model)
        self.time_to_first_token.record(result.first_token_s, model)
        self.tokens_generated.add(len(result.token_ids), model)
        span = trace.get_current_span()
        if span.is_recording():
            annotate(span, _facts(served, request, result))


def _facts(served: ServedVersion, request: SequenceFacts, result: Outcome) -> Facts:
    """A finished sequence's span facts (in the order `span_facts.expand` unpacks): the model,
    the result, and what the request asked for (a phrase bank's candidates, or the sampling
    parameters: OpenTelemetry's gen_ai.request.*); None: unset."""
    engine = served.ready_engine
    params = request.params
    # a phrase bank's search has candidates; asked by attribute, not isinstance on the
    # Protocol (typing's structural check took ~25 us a call, 4% of the front end's CPU)
    candidates = getattr(params, "candidates", None)
    asked: tuple[int | float | None, ...] = (None,) * 5  # a search has no sampling
    if candidates is None:
        params = cast(Params, params)
        seed = None if params.greedy else request.seed
        asked = (
            params.max_new_tokens,
            params.temperature,
            params.top_k or None,
            params.top_p,
            seed,
        )
    memory = result.memory
    return (
        engine.name, engine.description.version, engine.kind, str(engine.device),
        len(result.token_ids), str(result.finish_reason), result.queue_s,
        result.first_token_s, result.compute_s, wall_ns(result.submitted_at),
        result.batch_min, result.batch_max, result.batch_mean, request.priority,
        served.version, candidates, *asked,
        None if memory is None else memory.device_allocated_bytes,
        None if memory is None else memory.device_peak_bytes,
        None if memory is None else memory.rss_bytes,
    )  # fmt: skip
