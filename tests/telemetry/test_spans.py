"""Spans of an in-process daemon, read from the SDK's in-memory exporter: one server span per
call with RPC and gen_ai attributes, stage events, error statuses, item spans for batch and
stream items, and the caller's W3C trace context continued."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry import propagate
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.trace import SpanKind, StatusCode

from retd.model.embed import load_split
from retd.model.phrase_bank import save_phrase_bank
from retd.v1 import decoder_pb2 as pb
from tests.telemetry.conftest import SERVICE, InProcess, embedding, in_process_daemon

STAGES = ["queued", "admitted", "first_token", "finished"]


def the_span(daemon: InProcess, method: str) -> ReadableSpan:
    (span,) = daemon.finished(1, f"{SERVICE}/{method}")
    return span


def assert_rpc_attributes(span: ReadableSpan, method: str, port: int, code: int) -> None:
    attributes = span.attributes or {}
    assert span.kind is SpanKind.SERVER
    assert span.name == f"{SERVICE}/{method}"
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == SERVICE
    assert attributes["rpc.method"] == method
    assert attributes["rpc.grpc.status_code"] == code
    assert attributes["server.port"] == port


def assert_sequence_attributes(span: ReadableSpan, generated: int, max_tokens: int) -> None:
    """The attributes and events a finished sequence puts on its span."""
    a = span.attributes or {}
    assert a["gen_ai.request.model"] == "ret_v21"
    assert a["gen_ai.usage.output_tokens"] == generated
    assert a["gen_ai.request.max_tokens"] == max_tokens
    assert tuple(a["gen_ai.response.finish_reasons"]) in (("length",), ("eos",), ("stop",))
    assert a["retd.model.device"] == "cpu"
    assert a["retd.memory.rss_bytes"] > 0
    queue, compute = a["retd.queue_ms"], a["retd.compute_ms"]
    ttft, total = a["retd.time_to_first_token_ms"], a["retd.total_ms"]
    assert min(queue, compute, ttft, total) >= 0
    assert queue <= ttft <= total
    assert total == pytest.approx(queue + compute)
    low, high, mean = a["retd.batch_size.min"], a["retd.batch_size.max"], a["retd.batch_size.mean"]
    assert 1 <= low <= mean <= high
    names = [event.name for event in span.events]
    assert names == STAGES
    stamps = [event.timestamp for event in span.events]
    assert stamps == sorted(stamps)
    assert span.start_time <= stamps[0] and stamps[-1] <= span.end_time


def test_decode_has_one_server_span_with_rpc_and_model_attributes(daemon: InProcess) -> None:
    response = daemon.stub.Decode(pb.DecodeRequest(embedding=embedding(1), max_new_tokens=12))
    span = the_span(daemon, "Decode")
    assert_rpc_attributes(span, "Decode", daemon.port, 0)
    assert_sequence_attributes(span, response.usage.generated_tokens, 12)
    a = span.attributes or {}
    assert a["gen_ai.response.finish_reasons"] == (
        "length" if response.finish_reason == pb.FINISH_REASON_LENGTH else "eos",
    )
    # A lone call runs in a batch of one.
    assert (a["retd.batch_size.min"], a["retd.batch_size.max"], a["retd.batch_size.mean"]) == (
        1, 1, 1.0,
    )  # fmt: skip
    assert span.status.status_code is not StatusCode.ERROR
    assert span.parent is None  # no traceparent sent: a new trace
    assert len(daemon.spans.get_finished_spans()) == 1


def test_generate_span_shows_the_sampling_parameters(daemon: InProcess) -> None:
    request = pb.GenerateRequest(
        embedding=embedding(2), max_new_tokens=10, temperature=0.7, top_p=0.9, top_k=50, seed=42
    )
    response = daemon.stub.Generate(request)
    span = the_span(daemon, "Generate")
    assert_rpc_attributes(span, "Generate", daemon.port, 0)
    assert_sequence_attributes(span, response.usage.generated_tokens, 10)
    a = span.attributes or {}
    assert a["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert a["gen_ai.request.top_k"] == 50
    assert a["gen_ai.request.seed"] == 42 == response.seed


def test_generate_stream_span_has_the_same_attributes_and_status_ok(daemon: InProcess) -> None:
    request = pb.GenerateRequest(embedding=embedding(3), max_new_tokens=16, temperature=0)
    chunks = list(daemon.stub.GenerateStream(request))
    span = the_span(daemon, "GenerateStream")
    assert_rpc_attributes(span, "GenerateStream", daemon.port, 0)
    assert_sequence_attributes(span, chunks[-1].usage.generated_tokens, 16)
    assert sum(len(c.token_ids) for c in chunks) == chunks[-1].usage.generated_tokens
    assert span.status.status_code is StatusCode.OK or span.status.is_unset
    assert span.status.status_code is not StatusCode.ERROR


def test_wrong_dimension_is_an_error_span_with_invalid_argument(daemon: InProcess) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        daemon.stub.Decode(pb.DecodeRequest(embedding=embedding(4, dim=5), max_new_tokens=4))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    span = the_span(daemon, "Decode")
    assert_rpc_attributes(span, "Decode", daemon.port, 3)
    assert span.status.status_code is StatusCode.ERROR
    assert "INVALID_ARGUMENT" in (span.status.description or "")
    assert "embedding" in (span.status.description or "")
    # No sequence ran: no model attributes, no stage events.
    assert "gen_ai.usage.output_tokens" not in (span.attributes or {})
    assert not span.events


def test_unknown_model_is_status_code_5(daemon: InProcess) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        daemon.stub.Generate(pb.GenerateRequest(model="nope", embedding=embedding(5)))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    span = the_span(daemon, "Generate")
    assert_rpc_attributes(span, "Generate", daemon.port, 5)
    assert span.status.status_code is StatusCode.ERROR
    assert "NOT_FOUND" in (span.status.description or "")


def test_stream_cancelled_by_the_client_is_status_code_1(daemon: InProcess) -> None:
    # Greedy and the model's full length: far longer than the cancel takes to arrive.
    request = pb.GenerateRequest(embedding=embedding(6), max_new_tokens=256, temperature=0)
    call = daemon.stub.GenerateStream(request)
    first = next(call)
    assert not first.finish_reason  # mid-way: the last chunk has not come yet
    assert call.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() is grpc.StatusCode.CANCELLED
    span = the_span(daemon, "GenerateStream")  # polls: the server learns of it later
    assert_rpc_attributes(span, "GenerateStream", daemon.port, 1)
    assert span.status.status_code is StatusCode.ERROR
    assert "CANCELLED" in (span.status.description or "")
    assert "gen_ai.usage.output_tokens" not in (span.attributes or {})  # it never finished


def item_spans(daemon: InProcess, method: str, count: int) -> tuple[ReadableSpan, list]:
    rpc = the_span(daemon, method)
    items = daemon.finished(count, f"{SERVICE}/{method} item")
    assert len(items) == count
    context = rpc.get_span_context()
    for item in items:
        assert item.parent is not None
        assert item.parent.span_id == context.span_id
        assert item.context.trace_id == context.trace_id
        assert [link.context.span_id for link in item.links] == [context.span_id]
        assert item.links[0].context.trace_id == context.trace_id
    return rpc, items


def test_decode_batch_has_a_span_per_item_child_of_and_linked_to_the_call(
    daemon: InProcess,
) -> None:
    embeddings = [embedding(7), embedding(8, dim=5), embedding(9)]
    response = daemon.stub.DecodeBatch(
        pb.DecodeBatchRequest(embeddings=embeddings, max_new_tokens=8)
    )
    assert [r.WhichOneof("outcome") for r in response.results] == ["response", "error", "response"]
    rpc, items = item_spans(daemon, "DecodeBatch", 3)
    assert_rpc_attributes(rpc, "DecodeBatch", daemon.port, 0)  # a bad item fails only itself
    by_index = {(s.attributes or {})["retd.item"]: s for s in items}
    assert sorted(by_index) == ["0", "1", "2"]
    assert by_index["1"].status.status_code is StatusCode.ERROR
    assert "INVALID_ARGUMENT" in (by_index["1"].status.description or "")
    for index in ("0", "2"):
        assert by_index[index].status.status_code is not StatusCode.ERROR
        generated = response.results[int(index)].response.usage.generated_tokens
        assert_sequence_attributes(by_index[index], generated, 8)
    assert len(daemon.spans.get_finished_spans()) == 4


def test_decode_stream_items_carry_the_callers_ids(daemon: InProcess) -> None:
    requests = [
        pb.DecodeStreamRequest(id="alpha", embedding=embedding(10), max_new_tokens=6),
        pb.DecodeStreamRequest(id="beta", embedding=embedding(11, dim=3), max_new_tokens=6),
        pb.DecodeStreamRequest(id="gamma", model="nope", embedding=embedding(12)),
    ]
    answers = {a.id: a for a in daemon.stub.DecodeStream(iter(requests))}
    assert sorted(answers) == ["alpha", "beta", "gamma"]
    rpc, items = item_spans(daemon, "DecodeStream", 3)
    assert_rpc_attributes(rpc, "DecodeStream", daemon.port, 0)
    by_id = {(s.attributes or {})["retd.item"]: s for s in items}
    assert sorted(by_id) == ["alpha", "beta", "gamma"]
    assert_sequence_attributes(by_id["alpha"], answers["alpha"].response.usage.generated_tokens, 6)
    assert "INVALID_ARGUMENT" in (by_id["beta"].status.description or "")
    assert "NOT_FOUND" in (by_id["gamma"].status.description or "")
    assert by_id["alpha"].status.status_code is not StatusCode.ERROR


def test_caller_trace_context_is_continued(daemon: InProcess) -> None:
    client_tracer = TracerProvider().get_tracer("test-client")
    with client_tracer.start_as_current_span("client call", kind=SpanKind.CLIENT) as client:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        assert "traceparent" in carrier
        daemon.stub.Decode(
            pb.DecodeRequest(embedding=embedding(13), max_new_tokens=4),
            metadata=list(carrier.items()),
        )
    span = the_span(daemon, "Decode")
    client_context = client.get_span_context()
    assert span.context.trace_id == client_context.trace_id
    assert span.parent is not None and span.parent.span_id == client_context.span_id
    assert span.parent.is_remote
    assert span.context.span_id != client_context.span_id


def test_concurrent_calls_share_batches(daemon: InProcess) -> None:
    barrier = threading.Barrier(8)

    def call(seed: int) -> pb.DecodeResponse:
        barrier.wait()
        return daemon.stub.Decode(pb.DecodeRequest(embedding=embedding(seed), max_new_tokens=64))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(100, 108)))
    spans = daemon.finished(8, f"{SERVICE}/Decode")
    assert len(spans) == 8
    generated = sorted(r.usage.generated_tokens for r in responses)
    assert sorted((s.attributes or {})["gen_ai.usage.output_tokens"] for s in spans) == generated
    for span in spans:
        a = span.attributes or {}
        assert 1 <= a["retd.batch_size.min"] <= a["retd.batch_size.mean"]
        assert a["retd.batch_size.mean"] <= a["retd.batch_size.max"] <= 8
    assert max((s.attributes or {})["retd.batch_size.max"] for s in spans) > 1


def test_server_address_is_the_address_served_on(checkpoint: Path) -> None:
    # All of 127.0.0.0/8 is loopback: a second address on the same machine.
    with in_process_daemon(checkpoint, ["--host", "127.0.0.2"]) as daemon:
        daemon.stub.Decode(pb.DecodeRequest(embedding=embedding(15), max_new_tokens=2))
        span = the_span(daemon, "Decode")
    assert (span.attributes or {})["server.address"] == "127.0.0.2"


def test_a_phrase_bank_call_span_has_its_candidates_and_no_sampling_parameters(
    tmp_path: Path,
) -> None:
    split = load_split(Path(__file__).parents[1] / "data" / "embedded", "train")
    bank = save_phrase_bank(
        tmp_path / "bank", split.texts[:32], split.embeddings[:32].astype(np.float32), name="bank"
    )
    with in_process_daemon(bank) as daemon:
        request = pb.GenerateRequest(embedding=embedding(16), top_k=3)
        response = daemon.stub.Generate(request)
        span = the_span(daemon, "Generate")
    a = span.attributes or {}
    assert a["retd.candidates"] == 3 == len(response.candidates)
    assert a["retd.model.kind"] == "phrase_bank"
    assert not [
        key for key in a if key.startswith("gen_ai.request.") and key != "gen_ai.request.model"
    ]
