"""The daemon's spans for the OTLP export process (server/span_records.py): on any span a
program makes, `RecordingTracer` decides what OpenTelemetry's SDK tracer decides (ids,
parents, sampling, flags, trace state), and the export process encodes its record
(server/otlp_encode.py) byte for byte as OpenTelemetry encodes the SDK's span, a finished
sequence's facts deferred to it (server/span_facts.py) included."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from retd.server.otlp_encode import RecordEncoder
from retd.server.span_facts import Facts, annotate, expand
from retd.server.span_records import RecordedSpan, RecordingTracerProvider

RESOURCE = Resource({"service.name": "retd"})


class Trouble(ValueError):
    """An error of a module's own (a span names its type with the module)."""


class CountingIds(IdGenerator):
    """Ids from a counter: two tracers given one each draw the same ids."""

    def __init__(self, random_trace_ids: bool) -> None:
        self.count = 0
        self.random = random_trace_ids

    def generate_span_id(self) -> int:
        self.count += 1
        return self.count * 0x9E3779B9

    def generate_trace_id(self) -> int:
        self.count += 1
        return self.count * 0x9E3779B97F4A7C15  # spread, so ratio sampling goes both ways

    def is_trace_id_random(self) -> bool:
        return self.random


scalars = st.one_of(
    st.text(max_size=8),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
)
values = st.one_of(scalars, st.lists(st.text(max_size=4), max_size=3), st.lists(st.integers()))
# keys set again, too; some a sequence's facts set (server/span_facts.py)
keys = st.sampled_from(["a", "b", "retd.priority", "gen_ai.request.model"]) | st.text(
    min_size=1, max_size=6
)
attributes = st.dictionaries(keys, values, max_size=5)
timestamps = st.integers(1, 2**62)
statuses = st.sampled_from(list(StatusCode))

# one step of a span's life: (what, arguments)
steps = st.one_of(
    st.tuples(st.just("attributes"), attributes),
    st.tuples(st.just("attribute"), st.tuples(keys, values)),
    st.tuples(st.just("event"), st.tuples(st.text(max_size=6), attributes, timestamps)),
    st.tuples(st.just("status"), st.tuples(statuses, st.none() | st.text(max_size=6))),
    st.tuples(st.just("status object"), st.tuples(statuses, st.none() | st.text(max_size=6))),
    st.tuples(st.just("name"), st.text(max_size=6)),
    st.tuples(st.just("link"), st.tuples(st.booleans(), attributes)),
    st.tuples(st.just("exception"), st.tuples(attributes, timestamps)),
    st.tuples(st.just("facts"), st.lists(st.integers(0, 10**6), min_size=8, max_size=8)),
)


def _facts(draw: list[int]) -> Facts:
    """A finished sequence's facts (as `span_facts.expand` takes them) from eight numbers;
    each optional one unset where its number is even."""
    a, b, c, d, e, f, g, h = draw
    maybe = [None if n % 2 == 0 else n for n in draw]
    return (
        f"model{a % 3}", "2.1.0", "ret", "cpu", b, "stop", c / 1e4, d / 1e4, e / 1e3,
        10**18 + f, 1, 64, g / 7, h % 3, a, maybe[0], maybe[1], maybe[2] and c / 10,
        maybe[3], maybe[4] and d / 1e6, maybe[5], maybe[6], maybe[7], maybe[5],
    )  # fmt: skip


samplers: dict[str, Sampler] = {
    "default": DEFAULT_ON,  # the very object: the recording tracer's shortcut for new traces
    "always_on": ALWAYS_ON,
    "always_off": ALWAYS_OFF,
    "parentbased_always_on": ParentBased(ALWAYS_ON),
    "parentbased_always_off": ParentBased(ALWAYS_OFF),
    "traceidratio 0.5": TraceIdRatioBased(0.5),
}


@dataclass(frozen=True)
class Program:
    sampler: str
    random_trace_ids: bool
    parent: str  # none, remote sampled, remote unsampled, local
    kind: SpanKind
    start_attributes: dict[str, Any]
    links: list[tuple[bool, dict[str, Any]]]
    steps: list[tuple[str, Any]]
    after_end: list[tuple[str, Any]]


programs = st.builds(
    Program,
    st.sampled_from(sorted(samplers)),
    st.booleans(),
    st.sampled_from(["none", "remote sampled", "remote unsampled", "local"]),
    st.sampled_from(list(SpanKind)),
    attributes,
    st.lists(st.tuples(st.booleans(), attributes), max_size=2),
    st.lists(steps, max_size=8),
    st.lists(steps, max_size=2),
)

LINKED = SpanContext(0xAB, 0xCD, is_remote=True, trace_flags=TraceFlags(1))
STATE = TraceState([("vendor", "x")])


def _link_context(valid: bool) -> SpanContext:
    return LINKED if valid else SpanContext(0, 0, is_remote=False, trace_state=STATE)


def _apply(span: trace.Span, step: tuple[str, Any], error: BaseException) -> None:
    what, args = step
    if what == "attributes":
        span.set_attributes(args)
    elif what == "attribute":
        span.set_attribute(*args)
    elif what == "event":
        name, attrs, when = args
        span.add_event(name, attrs, when)
    elif what == "status":
        span.set_status(*args)
    elif what == "status object":
        span.set_status(Status(*args))
    elif what == "name":
        span.update_name(args)
    elif what == "link":
        valid, attrs = args
        span.add_link(_link_context(valid), attrs)
    elif what == "facts":  # expanded on the SDK's span, deferred to the export on ours
        annotate(span, _facts(args))
    else:
        attrs, when = args
        span.record_exception(error, attrs, when)


def _run(program: Program, recording: bool, error: BaseException) -> tuple[list[bytes], Any]:
    """The program on a tracer (the SDK's, or the recording one with the SDK provider's
    settings): each exported span's OTLP encoding, and the contexts the program saw."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(
        sampler=samplers[program.sampler],
        resource=RESOURCE,
        id_generator=CountingIds(program.random_trace_ids),
    )
    processor = SimpleSpanProcessor(memory)
    provider.add_span_processor(processor)
    tracer_provider: trace.TracerProvider = provider
    if recording:
        tracer_provider = RecordingTracerProvider(provider, processor)
    tracer = tracer_provider.get_tracer("retd.server")
    flags = {"remote sampled": "01", "remote unsampled": "00"}.get(program.parent, "01")
    carrier = {
        "traceparent": f"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}",
        "tracestate": "congo=t61rcWkgMzE",
    }
    parent: Context | None = None
    if program.parent.startswith("remote"):
        parent = propagate.extract(carrier)
    seen = []
    outers = tracer.start_as_current_span("outer", parent, start_time=10, end_on_exit=False)
    with outers as outer:
        seen.append(outer.get_span_context())
        context = None if program.parent == "local" else parent
        links = [Link(_link_context(valid), attrs) for valid, attrs in program.links]
        span = tracer.start_span(
            "inner", context, program.kind, program.start_attributes, links, start_time=20
        )
        seen.append((span.get_span_context(), span.is_recording()))
        for step in program.steps:
            _apply(span, step, error)
        span.end(end_time=30)
        for step in program.after_end:  # ignored: the span has ended
            _apply(span, step, error)
        span.end(end_time=40)
    outer.end(end_time=50)
    finished = memory.get_finished_spans()
    if recording:
        assert all(isinstance(s, RecordedSpan) for s in finished)
    if recording:  # the export process's encoding of the records
        encoded = [RecordEncoder().request(RESOURCE, [s.record()]) for s in finished]
    else:  # OpenTelemetry's of the SDK's spans
        encoded = [encode_spans([s]) for s in finished]
    return [message.SerializeToString() for message in encoded], seen


@settings(max_examples=150, deadline=None)
@given(programs)
def test_recorded_spans_export_as_the_sdks(program: Program) -> None:
    try:
        raise Trouble("the error a span records")
    except Trouble as caught:
        error = caught
    sdk, sdk_seen = _run(program, recording=False, error=error)
    recorded, recorded_seen = _run(program, recording=True, error=error)
    assert recorded_seen == sdk_seen
    assert recorded == sdk


def test_the_facts_drawn_are_what_expand_takes() -> None:
    attributes, events = expand(_facts([1] * 8))  # every optional fact set
    assert len(attributes) == 25
    assert [name for name, _ in events] == ["queued", "admitted", "first_token", "finished"]
