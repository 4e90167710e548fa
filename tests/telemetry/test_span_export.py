"""The OTLP span exporter's child process (server/span_export.py): what it exports is what
OpenTelemetry's exporter would have exported from the daemon, byte for byte (its encoding:
server/otlp_encode.py), and a child that dies is replaced."""

from __future__ import annotations

import os
import signal

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from retd.server.otlp_encode import _PAIRS, RecordEncoder
from retd.server.span_export import NICE, ProcessSpanExporter, span_record
from tests._wait import poll
from tests.telemetry.conftest import Receiver

scalars = st.one_of(
    st.text(max_size=12),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
)
lists = st.one_of(
    st.lists(st.text(max_size=5), max_size=3),
    st.lists(st.integers(0, 9)),
    st.lists(st.booleans(), max_size=2),
    st.lists(st.floats(allow_nan=False), max_size=2),
)
values = st.one_of(scalars, lists, st.sampled_from([0, 1, True, False, 0.0, -0.0, "", "ok"]))
attributes = st.dictionaries(
    st.sampled_from(["a", "b"]) | st.text(min_size=1, max_size=10), values, max_size=6
)

ENCODER = RecordEncoder()  # one for every example: pairs it has seen before come from its cache


def spans(
    attrs: dict[str, object],
    events: list[tuple[dict[str, object], int]],
    kind: SpanKind,
    status: StatusCode,
) -> list[ReadableSpan]:
    """A parent and a child span linked to it, with `attrs` and `events` (attributes,
    timestamp), finished."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "retd", "r": 1}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("retd.server", "1.2")
    with tracer.start_as_current_span("parent", kind=kind) as parent:
        links = [Link(parent.get_span_context(), {"why": "item"})]
        with tracer.start_as_current_span("child", links=links, attributes=attrs) as child:
            for i, (event, timestamp) in enumerate(events):
                child.add_event(f"e{i % 2}", event, timestamp=timestamp)
            child.set_status(Status(status, "why" if status is StatusCode.ERROR else None))
    return list(memory.get_finished_spans())


@settings(max_examples=40, deadline=None)
@given(
    attributes,
    # events with attributes and without (encoded from their name's bytes), at any time
    st.lists(
        st.tuples(attributes, st.sampled_from([0, 1, 2**64 - 1]) | st.integers(0, 2**64 - 1)),
        max_size=4,
    ),
    st.sampled_from(list(SpanKind)),
    st.sampled_from(list(StatusCode)),
)
def test_records_encode_as_opentelemetry_encodes_the_spans(
    attrs: dict[str, object],
    events: list[tuple[dict[str, object], int]],
    kind: SpanKind,
    status: StatusCode,
) -> None:
    originals = spans(attrs, events, kind, status)
    resource = originals[0].resource
    records = [span_record(span) for span in originals]
    encoded = ENCODER.request(resource, records).SerializeToString()
    assert encoded == encode_spans(originals).SerializeToString()


def test_values_that_compare_equal_encode_apart() -> None:
    """1 == True == 1.0 and 0.0 == -0.0 in Python: an encoder that kept one's bytes for
    another's would export the wrong type or sign."""
    encoder = RecordEncoder()
    lookalikes = [1, True, 1.0, "1", [1], [True], [1.0], ["1"], (1,), 0.0, -0.0, [0.0], [-0.0]]
    for value in lookalikes + lookalikes[::-1]:
        originals = spans({"a": value}, [], SpanKind.SERVER, StatusCode.UNSET)
        records = [span_record(span) for span in originals]
        encoded = encoder.request(originals[0].resource, records).SerializeToString()
        assert encoded == encode_spans(originals).SerializeToString(), value


def test_the_encoders_pairs_stay_bounded() -> None:
    encoder = RecordEncoder()
    (span,) = spans({}, [], SpanKind.SERVER, StatusCode.OK)[:1]
    record = span_record(span)
    for count in range(2 * _PAIRS):  # a counter that never repeats
        attributes = {"retd.memory.rss_bytes": count, "rpc.method": "Decode"}
        encoder.request(span.resource, [(*record[:6], attributes, *record[7:])])
    assert len(encoder._pairs) <= _PAIRS


def test_the_child_exports_flushes_and_is_replaced_when_it_dies(receiver: Receiver) -> None:
    exporter = ProcessSpanExporter(receiver.endpoint, insecure=True)
    try:
        assert exporter.export(spans({"a": 1}, [], SpanKind.SERVER, StatusCode.OK)) == (
            SpanExportResult.SUCCESS
        )
        assert exporter.force_flush()  # returns once the child has exported the batch
        assert [s.name for s in receiver.servicer.spans()] == ["child", "parent"]
        first = exporter._started()
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, first.pid) == min(ours + NICE, 19)
        if hasattr(os, "SCHED_IDLE"):  # Linux: the idle policy, over the niceness
            assert os.sched_getscheduler(first.pid) == os.SCHED_IDLE
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        exporter.export(spans({"b": 2}, [], SpanKind.SERVER, StatusCode.OK))
        assert exporter.force_flush()
        assert exporter._started().pid != first.pid
        poll(lambda: len(receiver.servicer.spans()) == 4, what="the new child's spans")
        assert receiver.servicer.spans()[-1].attributes == {}  # the parent: no attributes
        assert receiver.servicer.spans()[-2].attributes == {"b": 2}
    finally:
        exporter.shutdown()
    child = exporter._child
    assert child is not None and child.poll() == 0  # shutdown waited for its exit
    assert exporter.export(spans({}, [], SpanKind.SERVER, StatusCode.OK)) == (
        SpanExportResult.FAILURE
    )


def test_a_flush_the_child_cannot_answer_in_time_returns_false(receiver: Receiver) -> None:
    exporter = ProcessSpanExporter(receiver.endpoint, insecure=True)
    try:
        exporter.export(spans({"a": 1}, [], SpanKind.SERVER, StatusCode.OK))
        assert exporter.force_flush()
        child = exporter._started()
        child.send_signal(signal.SIGSTOP)  # a child stuck in an export
        try:
            assert exporter.force_flush(timeout_millis=200) is False
        finally:
            child.send_signal(signal.SIGCONT)
    finally:
        exporter.shutdown()
    assert child.poll() == 0  # shutdown ended it all the same
