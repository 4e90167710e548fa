"""Telemetry fixtures: an in-process daemon with real OpenTelemetry SDK providers (spans to
an in-memory exporter, metrics to an in-memory reader), and a real OTLP/gRPC trace receiver
on loopback for the subprocess daemons."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from retd.server.app import Daemon
from retd.server.config import add_arguments, load_config
from retd.server.telemetry import Telemetry
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll

T = TypeVar("T")
SERVICE = "retd.v1.Decoder"
POLL_TIMEOUT_S = 20.0


def embedding(seed: int, dim: int = 768) -> pb.Embedding:
    values = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    values /= np.linalg.norm(values)
    return pb.Embedding(vector=pb.FloatVector(values=values.tolist()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- the in-process daemon ----------------------------------------------------------------


@dataclass
class InProcess:
    daemon: Daemon
    port: int
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    channel: grpc.Channel
    stub: pb_grpc.DecoderStub
    loop: asyncio.AbstractEventLoop
    stopping: concurrent.futures.Future[None] | None = None

    def begin_stop(self) -> concurrent.futures.Future[None]:
        """Start draining the daemon (once); the future completes when it has stopped."""
        if self.stopping is None:
            self.stopping = asyncio.run_coroutine_threadsafe(self.daemon.stop(), self.loop)
        return self.stopping

    def finished(self, count: int, name: str | None = None) -> list[ReadableSpan]:
        """The finished spans (named `name`, if given) once there are at least `count`."""

        def ready() -> list[ReadableSpan]:
            spans = [s for s in self.spans.get_finished_spans() if name in (None, s.name)]
            return spans if len(spans) >= count else []

        return poll(ready, POLL_TIMEOUT_S, f"{count} finished spans named {name or 'anything'}")


@contextlib.contextmanager
def in_process_daemon(checkpoint: Path, extra: Sequence[str] = ()) -> Iterator[InProcess]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--checkpoint", str(checkpoint), "--port", "0", "--metrics-port", "0", *extra]
    )
    config = load_config(args, {})
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    daemon = Daemon(config, Telemetry(tracer_provider, meter_provider))

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="retd-daemon", daemon=True)
    thread.start()

    running: InProcess | None = None
    try:
        asyncio.run_coroutine_threadsafe(daemon.start(), loop).result(120)
        channel = grpc.insecure_channel(f"{config.host}:{daemon.port}")
        stub = pb_grpc.DecoderStub(channel)
        running = InProcess(daemon, daemon.port, exporter, reader, channel, stub, loop)
        try:
            yield running
        finally:
            channel.close()
    finally:
        try:
            if running is not None:
                running.begin_stop().result(120)
            else:
                asyncio.run_coroutine_threadsafe(daemon.stop(), loop).result(120)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()


@pytest.fixture(scope="module")
def shared_daemon(checkpoint: Path) -> Iterator[InProcess]:
    with in_process_daemon(checkpoint) as running:
        yield running


@pytest.fixture
def daemon(shared_daemon: InProcess) -> InProcess:
    """The module's daemon with no spans recorded yet."""
    shared_daemon.spans.clear()
    return shared_daemon


# ---- a real OTLP/gRPC trace receiver -------------------------------------------------------


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Stores every ExportTraceServiceRequest it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(  # noqa: N802 (the generated servicer's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            requests = list(self.requests)
        return [
            ReceivedSpan(span, _attributes(resource_spans.resource.attributes))
            for request in requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]


@dataclass
class ReceivedSpan:
    proto: Any  # opentelemetry.proto.trace.v1.trace_pb2.Span
    resource: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.proto.name)

    @property
    def attributes(self) -> dict[str, Any]:
        return _attributes(self.proto.attributes)

    @property
    def trace_id(self) -> str:
        return bytes(self.proto.trace_id).hex()


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(pairs: Sequence[common_pb2.KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass
class Receiver:
    servicer: TraceReceiver
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    servicer = TraceReceiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Receiver(servicer, port)
    finally:
        server.stop(None)
