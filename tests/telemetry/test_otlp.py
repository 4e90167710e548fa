"""Traces end to end: a subprocess daemon exporting OTLP/gRPC to a real receiver on loopback,
configured by flags or by OpenTelemetry's standard environment."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from opentelemetry import propagate
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider

from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, start_server
from tests.telemetry.conftest import SERVICE, ReceivedSpan, Receiver, embedding

SERVER = trace_pb2.Span.SpanKind.SPAN_KIND_SERVER
ERROR = trace_pb2.Status.StatusCode.STATUS_CODE_ERROR


def call_everything(server: RunningServer) -> dict[str, int]:
    """A Decode, a GenerateStream, a DecodeBatch of two and a failing Decode; returns the
    tokens each successful call generated."""
    with server.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        decode = stub.Decode(pb.DecodeRequest(embedding=embedding(1), max_new_tokens=6))
        chunks = list(
            stub.GenerateStream(pb.GenerateRequest(embedding=embedding(2), max_new_tokens=5))
        )
        batch = stub.DecodeBatch(
            pb.DecodeBatchRequest(embeddings=[embedding(3), embedding(4)], max_new_tokens=4)
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Decode(pb.DecodeRequest(embedding=embedding(5, dim=3)))
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    return {
        "Decode": decode.usage.generated_tokens,
        "GenerateStream": chunks[-1].usage.generated_tokens,
        "DecodeBatch": sum(r.response.usage.generated_tokens for r in batch.results),
    }


def by_name(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    named: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    return named


def assert_exported(
    spans: list[ReceivedSpan], tokens: dict[str, int], port: int, service: str
) -> None:
    named = by_name(spans)
    assert sorted((name, len(s)) for name, s in named.items()) == [
        (f"{SERVICE}/Decode", 2),
        (f"{SERVICE}/DecodeBatch", 1),
        (f"{SERVICE}/DecodeBatch item", 2),
        (f"{SERVICE}/GenerateStream", 1),
    ]
    assert {span.resource["service.name"] for span in spans} == {service}

    ok, failed = sorted(named[f"{SERVICE}/Decode"], key=lambda s: s.proto.status.code)
    for method, span in (("Decode", ok), ("GenerateStream", named[f"{SERVICE}/GenerateStream"][0])):
        a = span.attributes
        assert span.proto.kind == SERVER
        assert (a["rpc.system"], a["rpc.service"], a["rpc.method"]) == ("grpc", SERVICE, method)
        assert a["rpc.grpc.status_code"] == 0 and a["server.port"] == port
        assert a["gen_ai.request.model"] == "ret_v21"
        assert a["gen_ai.usage.output_tokens"] == tokens[method]
        assert a["retd.model.device"] == "cpu" and a["retd.memory.rss_bytes"] > 0
        assert [e.name for e in span.proto.events] == [
            "queued", "admitted", "first_token", "finished",
        ]  # fmt: skip
    assert failed.attributes["rpc.grpc.status_code"] == 3
    assert failed.proto.status.code == ERROR
    assert "INVALID_ARGUMENT" in failed.proto.status.message

    (batch,) = named[f"{SERVICE}/DecodeBatch"]
    items = named[f"{SERVICE}/DecodeBatch item"]
    assert sorted(item.attributes["retd.item"] for item in items) == ["0", "1"]
    assert (
        sum(item.attributes["gen_ai.usage.output_tokens"] for item in items)
        == tokens["DecodeBatch"]
    )
    for item in items:
        assert item.proto.trace_id == batch.proto.trace_id
        assert item.proto.parent_span_id == batch.proto.span_id
        assert [link.span_id for link in item.proto.links] == [batch.proto.span_id]


def test_otlp_flags_export_every_call_and_shutdown_flushes(
    tmp_path: Path, checkpoint: Path, receiver: Receiver
) -> None:
    # The batch processor's default delay (5 s) is far off: only the shutdown flush can
    # deliver these spans before the process exits.
    server = start_server(
        tmp_path,
        ["--checkpoint", str(checkpoint), "--traces-exporter", "otlp",
         "--otlp-endpoint", receiver.endpoint],
        {"OTEL_BSP_SCHEDULE_DELAY": "60000"},
    )  # fmt: skip
    try:
        tokens = call_everything(server)
        assert receiver.servicer.spans() == []  # still batched in the daemon
    finally:
        assert server.stop() == 0, server.log()
    assert_exported(receiver.servicer.spans(), tokens, server.port, "retd")


def test_otel_environment_configures_tracing_and_the_service_name(
    tmp_path: Path, checkpoint: Path, receiver: Receiver
) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "retd-test",
    }
    server = start_server(tmp_path, ["--checkpoint", str(checkpoint)], env)
    try:
        tokens = call_everything(server)
        # The caller's trace continues across processes.
        client_tracer = TracerProvider().get_tracer("test-client")
        with client_tracer.start_as_current_span("client") as client:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            with server.channel() as channel:
                pb_grpc.DecoderStub(channel).ListModels(
                    pb.ListModelsRequest(), metadata=list(carrier.items())
                )
    finally:
        assert server.stop() == 0, server.log()
    spans = receiver.servicer.spans()
    (listed,) = [s for s in spans if s.name == f"{SERVICE}/ListModels"]
    assert listed.trace_id == format(client.get_span_context().trace_id, "032x")
    assert listed.proto.parent_span_id.hex() == format(client.get_span_context().span_id, "016x")
    assert listed.resource["service.name"] == "retd-test"
    others = [s for s in spans if s is not listed]
    assert_exported(others, tokens, server.port, "retd-test")
    assert listed.trace_id not in {s.trace_id for s in others}  # those started new traces


def test_sampler_always_off_exports_nothing_but_calls_work(
    tmp_path: Path, checkpoint: Path, receiver: Receiver
) -> None:
    env = {"OTEL_TRACES_SAMPLER": "always_off"}
    server = start_server(
        tmp_path,
        ["--checkpoint", str(checkpoint), "--traces-exporter", "otlp",
         "--otlp-endpoint", receiver.endpoint],
        env,
    )  # fmt: skip
    try:
        tokens = call_everything(server)
    finally:
        assert server.stop() == 0, server.log()
    assert all(count > 0 for count in tokens.values())
    assert receiver.servicer.spans() == []
