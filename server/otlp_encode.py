"""The span export child's OTLP encoding: span records (server/span_export.py's
`span_record`) straight to OTLP's `ExportTraceServiceRequest`.

OpenTelemetry's encoder (`encode_spans`) takes SDK spans and makes a protobuf message per
attribute and per span, then copies them into the request: ~60 us for one of retd's call
spans (30 attributes, 4 events) on a 2-core test machine, plus ~6 us to rebuild the span
from its record first, ~75% of the export child's CPU at ~1,100 spans/s. `RecordEncoder`
makes the same bytes (a test compares them on random spans) from the records: it fills each
span in place in the request, and most attribute pairs repeat from call to call (the method,
the model, the device, small counts, the finish reason), so it encodes each such pair once;
a float attribute is its key's bytes, kept, and its 8; a stage event (no attributes) the
bytes of its name around its 8-byte time. A span's run of them is parsed from their bytes
in one call: ~13 us a call span with the serialisation, against ~22 encoding floats, lists and
events field by field (512 recorded call spans, 2-core test machine).

`RecordExporter` is OpenTelemetry's own OTLP/gRPC span exporter (endpoint, headers,
certificates, compression, timeout, retries from the standard environment) with this
encoding in place of its `_translate_data`, the hook its exporters specialise.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, SpanFlags
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind

from retd.server.span_facts import DEFERRED, expand_record
from retd.server.span_records import Context

log = logging.getLogger(__name__)

T = TypeVar("T")

_KINDS = {kind.value: Span.SpanKind.Value(f"SPAN_KIND_{kind.name}") for kind in SpanKind}
_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
#: Pairs kept encoded: the repeated ones number in the tens; counters that never repeat
#: (memory, say) would fill it, so it starts again when full.
_PAIRS = 4096


def _value(value: Any) -> AnyValue:
    """An attribute's value, as OpenTelemetry encodes it."""
    if value is None:
        return AnyValue()
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, Sequence):
        return AnyValue(array_value=ArrayValue(values=[_value(v) for v in value]))
    if isinstance(value, Mapping):
        pairs = [KeyValue(key=str(k), value=_value(v)) for k, v in value.items()]
        return AnyValue(kvlist_value=KeyValueList(values=pairs))
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _flags(context: Context | None) -> int:
    return _HAS_IS_REMOTE | (_IS_REMOTE if context is not None and context[2] else 0)


class RecordEncoder:
    """Span records -> `ExportTraceServiceRequest` (see the module's doc). Each span is
    filled in place in the request (a message passed to a constructor is copied); its
    attributes are parsed from their encodings, each pair's encoded once where it repeats."""

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, type, Any], bytes] = {}
        self._floats: dict[str, bytes] = {}  # a float attribute's key: its bytes before the value
        self._stages: dict[str, tuple[bytes, bytes]] = {}  # an event's name: bytes around its time

    def request(self, resource: Resource, records: Sequence[tuple[Any, ...]]) -> Any:
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add(schema_url=resource.schema_url)
        resource_spans.resource.attributes.extend(_attributes(resource.attributes))
        scopes: dict[Any, Any] = {}  # a scope's spans, in the order first seen, as OTel's
        for record in records:
            scope = record[-1]
            spans = scopes.get(scope)
            if spans is None:
                scope_spans = resource_spans.scope_spans.add()
                scope_spans.scope.SetInParent()
                if scope is not None:
                    scope_spans.scope.name, scope_spans.scope.version = scope[0], scope[1] or ""
                    scope_spans.schema_url = scope[2] or ""
                spans = scopes[scope] = scope_spans.spans
            self._fill(spans.add(), record)
        return request

    def _fill(self, span: Span, record: tuple[Any, ...]) -> None:
        name, context, parent, kind, start, end, attributes, events, links, code, text, _ = record
        if any(event[0] == DEFERRED for event in events):  # a sequence's facts, to expand
            attributes, events = expand_record(attributes, events)
        pending: list[bytes] = []  # encoded attributes and events not yet in `span`
        pairs, floats, stages = self._pairs, self._floats, self._stages
        for key, value in attributes.items():
            of = type(value)
            if of is str or of is int or of is bool or (of in _SEQUENCES and _strings(value)):
                kept = (key, of, value if of is not list else tuple(value))
                pair = pairs.get(kept)
                pending.append(pair if pair is not None else self._pair(kept, value))
            elif of is float and (prefix := floats.get(key) or self._float(key)):
                pending += (prefix, _DOUBLE.pack(value))  # floats seldom repeat: keys do
            else:
                _merge(span, pending)
                span.attributes.extend(_attributes({key: value}))
        for event_name, event_attributes, timestamp in events:
            around = (
                None if event_attributes else (stages.get(event_name) or self._stage(event_name))
            )
            if around:  # a stage: its name's bytes, its time
                pending += (around[0], _FIXED64.pack(timestamp), around[1])
            else:
                _merge(span, pending)
                event = span.events.add(name=event_name, time_unix_nano=timestamp)
                event.attributes.extend(_attributes(event_attributes))
        _merge(span, pending)
        span.trace_id = context[0].to_bytes(16, "big")
        span.span_id = context[1].to_bytes(8, "big")
        if context[4]:
            span.trace_state = ",".join(f"{k}={v}" for k, v in context[4])
        if parent is not None:
            span.parent_span_id = parent[1].to_bytes(8, "big")
        span.name = name
        span.kind = _KINDS[kind]
        span.start_time_unix_nano = start
        span.end_time_unix_nano = end
        for link_context, link_attributes in links:
            link = span.links.add(
                trace_id=link_context[0].to_bytes(16, "big"),
                span_id=link_context[1].to_bytes(8, "big"),
                flags=_flags(link_context),
            )
            link.attributes.extend(_attributes(link_attributes))
        status = span.status
        status.SetInParent()
        if code:
            status.code = code
        if text:
            status.message = text
        span.flags = _flags(parent)

    def _pair(self, kept: tuple[str, type, Any], value: Any) -> bytes:
        """A string, int, bool or list-of-strings attribute encoded, and kept (under `kept`:
        its key, type and hashable value): they repeat."""
        pair = Span(attributes=_attributes({kept[0]: value})).SerializeToString()
        return _keep(self._pairs, kept, pair)

    def _float(self, key: str) -> bytes | None:
        """A float attribute's bytes before its value (a double is the last 8 bytes of its
        pair, whatever the value), kept; None for a key that cannot be encoded."""
        around = _split(Span(attributes=_attributes({key: _PROBE_FLOAT})), _PROBE_FLOAT_BYTES)
        return None if around is None else _keep(self._floats, key, around[0])

    def _stage(self, name: str) -> tuple[bytes, bytes] | None:
        """An event without attributes, as the bytes around its time (a fixed64; a time of 0,
        which proto3 leaves out, is parsed and left out when the request is serialised),
        kept; None for a name that cannot be encoded."""
        around = None
        with contextlib.suppress(ValueError):  # not UTF-8
            around = _split(
                Span(events=[Span.Event(name=name, time_unix_nano=_PROBE_TIME)]), _PROBE_TIME_BYTES
            )
        return None if around is None else _keep(self._stages, name, around)


_SEQUENCES = (list, tuple)  # of strings, the ones encoded once (an SDK span's are tuples)
_DOUBLE = struct.Struct("<d")
_FIXED64 = struct.Struct("<Q")
# Values whose bytes are found in an encoding: neither is valid UTF-8, so no key or name
# holds them, and no framing byte around them does either
_PROBE_FLOAT = 1.0000000000000002  # 01 00 00 00 00 00 f0 3f
_PROBE_FLOAT_BYTES = _DOUBLE.pack(_PROBE_FLOAT)
_PROBE_TIME = 0x0123456789ABCDEF  # ef cd ab 89 67 45 23 01
_PROBE_TIME_BYTES = _FIXED64.pack(_PROBE_TIME)


def _keep(cache: dict[Any, T], key: Any, value: T) -> T:
    """`value` kept in `cache` under `key`; a full cache starts again (see `_PAIRS`)."""
    if len(cache) >= _PAIRS:
        cache.clear()
    cache[key] = value
    return value


def _split(message: Any, value: bytes) -> tuple[bytes, bytes] | None:
    """`message`'s bytes before and after the one place `value`'s are (None if not once)."""
    encoded = message.SerializeToString()
    at = encoded.find(value)
    if at < 0 or encoded.find(value, at + 1) >= 0:
        return None
    return encoded[:at], encoded[at + len(value) :]


def _strings(value: list[Any]) -> bool:
    return all(type(item) is str for item in value)


def _merge(span: Any, pending: list[bytes]) -> None:
    """The encoded attributes and events in `pending` into `span`, in order (a repeated
    field's parsed items follow those it has)."""
    if pending:
        span.MergeFromString(b"".join(pending))
        pending.clear()


def _attributes(attributes: Mapping[str, Any]) -> list[KeyValue]:
    pairs = []
    for key, value in attributes.items():
        try:
            pairs.append(KeyValue(key=key, value=_value(value)))
        except Exception as error:  # as OpenTelemetry's: the span goes, without it
            log.exception("Failed to encode key %s: %s", key, error)
    return pairs


@dataclass(frozen=True)
class Batch:
    """Records of one resource, as `RecordExporter.export` takes them."""

    resource: Resource
    records: Sequence[tuple[Any, ...]]

    def __len__(self) -> int:  # what the exporter counts
        return len(self.records)


class RecordExporter(OTLPSpanExporter):
    """OpenTelemetry's OTLP/gRPC span exporter for `Batch`es of records."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._encoder = RecordEncoder()

    def _translate_data(self, data: Batch) -> Any:  # type: ignore[override]
        return self._encoder.request(data.resource, data.records)
