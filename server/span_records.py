"""Spans recorded as plain data, for OTLP export from a process of its own.

With `--traces-exporter otlp` the spans leave the daemon as plain tuples
(server/span_export.py: `span_record`) for a child that encodes and exports them. An SDK
span is a heavier thing to make only to be copied: its attributes are checked under a lock
at every set, each event becomes an object, the span processors are called at its start and
its end, and the copy is one more pass: ~60 us of the event loop's thread for a call's span
(30 attributes, 4 events; its start, attributes, end, copy and pickle) against ~17 here, at
~1,100 calls/s on 2 cores.

So for that exporter the daemon's tracer is `RecordingTracer`: the SDK's own sampler, id
generator, resource and batch span processor (all from the `TracerProvider` that
OpenTelemetry's environment configures), and spans that are the record `span_record` makes
(`RecordedSpan.record`), built as the call goes. It decides ids, parents, sampling and trace
flags as the SDK's tracer does (a test runs random span programs on both and compares what
they export, byte for byte). The console exporter, and the in-memory one tests use, keep the
SDK's tracer.

Attributes are stored as given, not checked: they are the daemon's own (server/telemetry.py),
of OpenTelemetry's attribute types.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import DEFAULT_ON, Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

from retd.server.span_facts import DEFERRED, Facts

Context = tuple[int, int, bool, int, tuple[tuple[str, str], ...]]

_UNSET = Status(StatusCode.UNSET)  # a span's status until it is set (never changed in place)
_NO_ATTRIBUTES: Mapping[str, types.AnyValue] = MappingProxyType({})


def context_record(context: SpanContext) -> Context:
    """A span context as builtins."""
    state = tuple(context.trace_state.items()) if context.trace_state else ()
    return context.trace_id, context.span_id, context.is_remote, int(context.trace_flags), state


class RecordedSpan(trace.Span):
    """A sampled span, kept as the fields of its export record."""

    __slots__ = (
        "_attributes", "_context", "_end_time", "_events", "_links", "_name",
        "_parent", "_processor", "_record_context", "_scope", "_start_time", "_status",
        "_kind", "resource",
    )  # fmt: skip

    def __init__(
        self,
        tracer: RecordingTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, types.AnyValue],
        links: Sequence[Link],
        start_time: int,
    ) -> None:
        self._name = name
        self._context = context
        self._record_context = context_record(context)
        self._parent = None if parent is None else context_record(parent)
        self._kind = kind
        self._start_time = start_time
        self._end_time: int | None = None
        self._attributes = attributes  # the span's own (`start_span` makes it)
        self._events: list[tuple[str, Any, int]] = []  # deferred facts: span_facts.py
        self._links: list[tuple[Context, dict[str, Any]]] = []
        for link in links:
            self.add_link(link.context, link.attributes)
        self._status = _UNSET
        self._processor = tracer.processor
        self._scope = tracer.scope
        self.resource = tracer.resource

    @property
    def context(self) -> SpanContext:  # what the batch span processor checks
        return self._context

    def record(self) -> tuple[Any, ...]:
        """What `span_export.span_record` makes of an SDK span."""
        status = self._status
        return (
            self._name, self._record_context, self._parent, self._kind.value,
            self._start_time, self._end_time, self._attributes, self._events, self._links,
            status.status_code.value, status.description, self._scope,
        )  # fmt: skip

    # ---- opentelemetry.trace.Span ------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self._end_time is not None:
            return
        if self._attributes.keys().isdisjoint(attributes):
            self._attributes.update(attributes)
        else:
            for key, value in attributes.items():
                self.set_attribute(key, value)

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        """A key set again moves to the end, as in the SDK's attributes (the order the
        export keeps)."""
        if self._end_time is None:
            self._attributes.pop(key, None)
            self._attributes[key] = value

    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self._end_time is None:
            when = time.time_ns() if timestamp is None else timestamp
            self._events.append((name, dict(attributes or {}), when))

    def defer(self, facts: Facts) -> None:
        """A finished sequence's facts, kept where their attributes and events go: the export
        child makes those (server/span_facts.py)."""
        if self._end_time is None:
            attributes = self._attributes
            key = DEFERRED if DEFERRED not in attributes else f"{DEFERRED}{len(attributes)}"
            attributes[key] = facts
            self._events.append((DEFERRED, facts, 0))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is None and _valid_link(context, attributes):
            self._links.append((context_record(context), dict(attributes or {})))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK's: OK is final, UNSET is ignored."""
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind, module = type(exception).__qualname__, type(exception).__module__
        self.add_event(
            "exception",
            {
                "exception.type": f"{module}.{kind}" if module not in ("", "builtins") else kind,
                "exception.message": str(exception),
                "exception.stacktrace": "".join(traceback.format_exception(exception)),
                "exception.escaped": str(escaped),
                **(attributes or {}),
            },
            timestamp,
        )

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = time.time_ns() if end_time is None else end_time
        self._processor.on_end(cast(ReadableSpan, self))  # the export record is `record()`


def _valid_link(context: SpanContext, attributes: types.Attributes) -> bool:
    """The SDK's rule: a valid context, or one that carries attributes or a trace state."""
    return bool(context and (context.is_valid or attributes or context.trace_state))


class RecordingTracer(trace.Tracer):
    """A tracer that makes `RecordedSpan`s with the decisions of `provider`'s (see the
    module's doc). `processor`: the span processor the provider exports through."""

    def __init__(
        self, provider: TracerProvider, processor: SpanProcessor, scope: tuple[str, Any, Any]
    ) -> None:
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        self.resource = provider.resource
        self.processor = processor
        self.scope = scope

    def start_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        links = links or ()
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if parent is None or not parent.is_valid:  # a new trace
            parent = None
            trace_id = self.ids.generate_trace_id()
            random_trace_id = self.ids.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random_trace_id = parent.trace_flags.random_trace_id
        if parent is None and self.sampler is DEFAULT_ON:  # what it decides for a new trace
            decision, trace_state, extra = Decision.RECORD_AND_SAMPLE, None, _NO_ATTRIBUTES
        else:
            sampling = self.sampler.should_sample(context, trace_id, name, kind, attributes, links)
            decision, trace_state = sampling.decision, sampling.trace_state
            extra = sampling.attributes
        flags = TraceFlags.SAMPLED if decision.is_sampled() else TraceFlags.DEFAULT
        if random_trace_id:
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(
            trace_id,
            self.ids.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=trace_state,
        )
        if not decision.is_recording():
            return trace.NonRecordingSpan(span_context)
        return RecordedSpan(
            self,
            name,
            span_context,
            parent,
            kind,
            {**extra, **(attributes or {})} if extra or attributes else {},
            links,
            time.time_ns() if start_time is None else start_time,
        )

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]  # the API's own context manager type
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace.Span]:
        span = self.start_span(
            name, context, kind, attributes, links, start_time,
            record_exception, set_status_on_exception,
        )  # fmt: skip
        with trace.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


class RecordingTracerProvider(trace.TracerProvider):
    """`provider`, configured as usual, handing out `RecordingTracer`s; its shutdown and
    flush are `provider`'s (its span processors, `processor` among them)."""

    def __init__(self, provider: TracerProvider, processor: SpanProcessor) -> None:
        self.provider = provider
        self.processor = processor

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> trace.Tracer:
        scope = InstrumentationScope(
            instrumenting_module_name, instrumenting_library_version or "", schema_url
        )
        record = (scope.name, scope.version, scope.schema_url)
        return RecordingTracer(self.provider, self.processor, record)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.provider.shutdown()
