"""Metrics: read through an InMemoryMetricReader on an in-process daemon, and end to end
through a subprocess daemon's Prometheus endpoint scraped over HTTP."""

from __future__ import annotations

import queue
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    Sum,
)
from prometheus_client.parser import text_string_to_metric_families

from retd.server.bench.load import rss_mib
from retd.server.config import ServerConfig
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import start_server
from tests.telemetry.conftest import POLL_TIMEOUT_S, embedding, free_port, in_process_daemon


def collect(reader: InMemoryMetricReader) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        metric.name: metric
        for resource_metrics in data.resource_metrics
        for scope_metrics in resource_metrics.scope_metrics
        for metric in scope_metrics.metrics
    }


def points(metric: Metric) -> dict[tuple[tuple[str, Any], ...], Any]:
    """Data points keyed by their sorted attributes."""
    return {tuple(sorted((p.attributes or {}).items())): p for p in metric.data.data_points}


def by_call(method: str, code: int) -> tuple[tuple[str, Any], ...]:
    return (("rpc.grpc.status_code", code), ("rpc.method", method))


MODEL = (("retd.model", "ret_v21"),)
DEFAULT_METRICS_PORT = ServerConfig().telemetry.metrics_port


def make_calls(stub: pb_grpc.DecoderStub) -> int:
    """3 good Decodes, 2 bad ones, a Generate, a GenerateStream, a ListModels; returns the
    tokens generated."""
    generated = 0
    for seed in range(3):
        request = pb.DecodeRequest(embedding=embedding(seed), max_new_tokens=5 + seed)
        generated += stub.Decode(request).usage.generated_tokens
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Decode(pb.DecodeRequest(embedding=embedding(9, dim=10)))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    request = pb.GenerateRequest(embedding=embedding(3), max_new_tokens=7, seed=1)
    generated += stub.Generate(request).usage.generated_tokens
    chunks = list(stub.GenerateStream(pb.GenerateRequest(embedding=embedding(4), max_new_tokens=9)))
    generated += chunks[-1].usage.generated_tokens
    stub.ListModels(pb.ListModelsRequest())
    return generated


def test_in_memory_metrics_count_every_call(checkpoint: Path) -> None:
    with in_process_daemon(checkpoint) as daemon:
        generated = make_calls(daemon.stub)
        metrics = collect(daemon.metrics)

    duration = metrics["retd.request.duration"]
    assert isinstance(duration.data, Histogram)
    assert duration.unit == "s"
    counts = {key: p.count for key, p in points(duration).items()}
    assert counts == {
        by_call("Decode", 0): 3,
        by_call("Decode", 3): 2,
        by_call("Generate", 0): 1,
        by_call("GenerateStream", 0): 1,
        by_call("ListModels", 0): 1,
    }
    for point in points(duration).values():
        assert isinstance(point, HistogramDataPoint)
        assert point.min >= 0 and point.sum >= point.max
        assert point.explicit_bounds[0] <= 0.001  # seconds: buckets finer than a millisecond
        assert sum(point.bucket_counts) == point.count

    requests = metrics["retd.requests"]
    assert isinstance(requests.data, Sum) and requests.data.is_monotonic
    assert {key: p.value for key, p in points(requests).items()} == counts

    tokens = metrics["retd.tokens.generated"]
    assert isinstance(tokens.data, Sum) and tokens.data.is_monotonic
    assert {key: p.value for key, p in points(tokens).items()} == {MODEL: generated}

    # One sequence per good Decode, Generate and GenerateStream.
    for name in ("retd.queue.duration", "retd.time_to_first_token"):
        assert isinstance(metrics[name].data, Histogram)
        assert {key: p.count for key, p in points(metrics[name]).items()} == {MODEL: 5}, name

    # Observable gauges, read at collection: the daemon is idle now.
    for name in ("retd.queue.depth", "retd.batch.running"):
        assert isinstance(metrics[name].data, Gauge)
        assert {key: p.value for key, p in points(metrics[name]).items()} == {MODEL: 0}, name
    assert {key: p.value for key, p in points(metrics["retd.requests.in_flight"]).items()} == {
        (): 0
    }
    (rss,) = points(metrics["retd.process.memory.rss"]).values()
    assert rss.value > 10 * 1024 * 1024  # torch and a model: well over 10 MiB resident
    assert "retd.device.memory.allocated" not in metrics or not points(
        metrics["retd.device.memory.allocated"]
    )  # CPU only: no device memory


def test_in_flight_gauge_counts_an_open_stream(checkpoint: Path) -> None:
    with in_process_daemon(checkpoint) as daemon:
        requests: queue.Queue[pb.DecodeStreamRequest | None] = queue.Queue()

        def stream() -> Iterator[pb.DecodeStreamRequest]:
            while (item := requests.get()) is not None:
                yield item

        answers = daemon.stub.DecodeStream(stream())
        requests.put(pb.DecodeStreamRequest(id="a", embedding=embedding(1), max_new_tokens=3))
        assert next(answers).id == "a"  # the call is open: its request stream is not closed

        def in_flight() -> int:
            return points(collect(daemon.metrics)["retd.requests.in_flight"])[()].value

        assert in_flight() == 1
        requests.put(None)
        assert list(answers) == []
        poll(lambda: in_flight() == 0, POLL_TIMEOUT_S, "the finished stream to leave the gauge")
        counts = points(collect(daemon.metrics)["retd.requests"])
        assert counts[by_call("DecodeStream", 0)].value == 1


# ---- Prometheus, end to end -------------------------------------------------------------


def scrape(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_values(family: Any, sample_name: str, **labels: str) -> list[float]:
    return [
        s.value
        for s in family.samples
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def test_prometheus_endpoint_serves_the_retd_metrics(tmp_path: Path, checkpoint: Path) -> None:
    metrics_port = free_port()
    server = start_server(
        tmp_path,
        ["--checkpoint", str(checkpoint), "--metrics-port", str(metrics_port)],
        {"OTEL_SERVICE_NAME": "retd-metrics"},
    )
    try:
        with server.channel() as channel:
            generated = make_calls(pb_grpc.DecoderStub(channel))
        families = scrape(metrics_port)
    finally:
        assert server.stop() == 0, server.log()

    retd = {name: f for name, f in families.items() if name.startswith("retd_")}
    assert set(retd) >= {
        "retd_request_duration_seconds",
        "retd_requests",  # the parser drops a counter's _total suffix from the family name
        "retd_queue_duration_seconds",
        "retd_time_to_first_token_seconds",
        "retd_tokens_generated",
        "retd_queue_depth",
        "retd_batch_running",
        "retd_requests_in_flight",
        "retd_process_memory_rss_bytes",
    }, sorted(families)
    # the garbage collector's runs and pauses: at least the full collection that froze the
    # model's objects once it loaded (server/heap.py)
    runs = sample_values(retd["retd_gc_collections"], "retd_gc_collections_total", generation="2")
    paused = sample_values(retd["retd_gc_pause_seconds"], "retd_gc_pause_seconds_total")
    assert runs and runs[0] >= 1 and len(paused) == 3 and min(paused) > 0, (runs, paused)
    duration = retd["retd_request_duration_seconds"]
    assert duration.type == "histogram"
    count = "retd_request_duration_seconds_count"
    assert sample_values(duration, count, rpc_method="Decode", rpc_grpc_status_code="0") == [3]
    assert sample_values(duration, count, rpc_method="Decode", rpc_grpc_status_code="3") == [2]
    assert sample_values(duration, count, rpc_method="GenerateStream") == [1]
    inf = sample_values(
        duration, "retd_request_duration_seconds_bucket", rpc_method="Decode", le="+Inf"
    )
    assert sorted(inf) == [2, 3]

    requests = retd["retd_requests"]
    assert requests.type == "counter"
    total = "retd_requests_total"
    assert sample_values(requests, total, rpc_method="Decode", rpc_grpc_status_code="0") == [3]
    assert sample_values(requests, total, rpc_method="Decode", rpc_grpc_status_code="3") == [2]
    assert sum(sample_values(requests, total)) == 8

    tokens = retd["retd_tokens_generated"]
    assert tokens.type == "counter"
    assert sample_values(tokens, "retd_tokens_generated_total", retd_model="ret_v21") == [generated]
    for name in ("retd_queue_duration_seconds", "retd_time_to_first_token_seconds"):
        assert sample_values(retd[name], f"{name}_count", retd_model="ret_v21") == [5], name
    assert sample_values(retd["retd_queue_depth"], "retd_queue_depth", retd_model="ret_v21") == [0]
    assert sample_values(retd["retd_requests_in_flight"], "retd_requests_in_flight") == [0]
    (rss,) = sample_values(retd["retd_process_memory_rss_bytes"], "retd_process_memory_rss_bytes")
    assert rss > 10 * 1024 * 1024
    (info,) = families["target_info"].samples  # the resource
    assert info.labels["service_name"] == "retd-metrics"


def test_a_taken_metrics_port_stops_the_server_with_a_clear_error(
    tmp_path: Path, checkpoint: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="server exited with 1") as caught:
            start_server(tmp_path, ["--checkpoint", str(checkpoint), "--metrics-port", str(port)])
    (line,) = [line for line in str(caught.value).splitlines() if "cannot start" in line]
    assert "ERROR" in line and "Address already in use" in line
    assert "Traceback" not in str(caught.value)


def test_a_taken_metrics_port_is_named_in_the_error(tmp_path: Path, checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as caught:
            start_server(tmp_path, ["--checkpoint", str(checkpoint), "--metrics-port", str(port)])
    (line,) = [line for line in str(caught.value).splitlines() if "cannot start" in line]
    expected = f"cannot start: the metrics endpoint cannot listen on 127.0.0.1:{port}: Address"
    assert f"{expected} already in use" in line, line
    # A port set explicitly is not replaced by another: the error says how to change it.
    assert "set another port with --metrics-port (or RETD_METRICS_PORT" in line, line


def test_a_second_daemon_on_the_default_metrics_port_takes_the_next_free_one(
    tmp_path: Path, checkpoint: Path
) -> None:
    """Two daemons started as `retd serve --port N` on one machine: the second finds the
    default metrics port (9464) taken by the first, and serves /metrics on the next free one
    instead, saying so."""
    first = start_server(tmp_path, ["--checkpoint", str(checkpoint)], default_metrics_port=True)
    try:
        second = start_server(
            tmp_path, ["--checkpoint", str(checkpoint)], default_metrics_port=True
        )
        try:
            with second.channel() as channel:
                stub = pb_grpc.DecoderStub(channel)
                stub.Decode(pb.DecodeRequest(embedding=embedding(1), max_new_tokens=2))
            second_families = scrape(second.metrics_port)
            first_families = scrape(first.metrics_port)
        finally:
            assert second.stop() == 0, second.log()
    finally:
        assert first.stop() == 0, first.log()
    assert first.metrics_port >= DEFAULT_METRICS_PORT
    assert second.metrics_port > DEFAULT_METRICS_PORT and second.metrics_port != first.metrics_port
    where = f"127.0.0.1:{second.metrics_port}"
    warning = (
        f"WARNING retd.server.metrics_endpoint: metrics port {DEFAULT_METRICS_PORT} is taken "
        f"(another retd?): /metrics listens on {where} instead; --metrics-port chooses the port"
    )
    assert warning in second.log(), second.log()
    assert f"metrics on http://{where}/metrics" in second.log()
    # Each endpoint is its own daemon's: only the second one served a call.
    total = "retd_requests_total"
    assert sample_values(second_families["retd_requests"], total, rpc_method="Decode") == [1]
    assert "retd_requests" not in first_families


def test_calls_refused_while_draining_are_counted(checkpoint: Path) -> None:
    with in_process_daemon(checkpoint) as daemon:
        requests: queue.Queue[pb.DecodeStreamRequest | None] = queue.Queue()

        def stream() -> Iterator[pb.DecodeStreamRequest]:
            while (item := requests.get()) is not None:
                yield item

        answers = daemon.stub.DecodeStream(stream())
        requests.put(pb.DecodeStreamRequest(id="a", embedding=embedding(1), max_new_tokens=2))
        assert next(answers).id == "a"
        stopped = daemon.begin_stop()  # drains: waits for the open stream
        gate = daemon.daemon.gate  # the calls interceptor's
        assert gate is not None
        poll(lambda: not gate.open, POLL_TIMEOUT_S, "the gate to close")
        with pytest.raises(grpc.RpcError) as caught:
            daemon.stub.Decode(pb.DecodeRequest(embedding=embedding(2), max_new_tokens=2))
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE

        def refusal_counted() -> dict[object, object]:
            # the client can see the status before the server's wrapper has recorded it
            counter = collect(daemon.metrics).get("retd.requests")
            counts = {key: p.value for key, p in points(counter).items()} if counter else {}
            return counts if counts.get(by_call("Decode", 14)) == 1 else {}

        try:
            counts = poll(refusal_counted, POLL_TIMEOUT_S, "the refused call to be counted")
        finally:
            requests.put(None)  # let the drain finish
            assert list(answers) == []
            stopped.result(30)
    assert counts == {by_call("Decode", 14): 1}  # the stream is still open: not counted yet


def test_the_rss_gauge_counts_the_engine_processes(tmp_path: Path, checkpoint: Path) -> None:
    """With --engine process the daemon's resident memory is its front end's and its
    engine process's: more than either alone."""
    metrics_port = free_port()
    server = start_server(
        tmp_path,
        ["--checkpoint", str(checkpoint), "--engine", "process", "--torch-threads", "1",
         "--metrics-port", str(metrics_port)],
    )  # fmt: skip
    try:
        families = scrape(metrics_port)
        (child,) = server.children()
        own, engine = (rss_mib(pid) for pid in (server.process.pid, child))
    finally:
        assert server.stop() == 0, server.log()
    name = "retd_process_memory_rss_bytes"
    (rss,) = sample_values(families[name], name)
    assert rss / 2**20 > max(own, engine) + 0.5 * min(own, engine)
    assert rss / 2**20 < 1.5 * (own + engine)
