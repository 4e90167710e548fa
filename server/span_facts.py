"""A finished sequence's span attributes and stage events, made from one tuple of facts.

`Telemetry.record_sequence` (server/telemetry.py) gathers what a finished sequence adds to
its call's span: ~25 attributes and four stage events. On an SDK span they are set at once
(`annotate` -> `expand`). A `RecordedSpan` (server/span_records.py: the spans of
`--traces-exporter otlp`) keeps the tuple itself (`RecordedSpan.defer`) where its attributes
and events would be, and the export child expands it as it encodes the span
(server/otlp_encode.py: `expand_record`): the dictionary, the events, their pickling and
the wall-clock conversions leave the event loop's thread for a child that runs on idle CPU
time (~4 us a call of the loop's and the span processor's, of ~13 with tracing on).

The order is the SDK's: the facts' attributes take the place in the span's attributes where
they were deferred (a key set again moves to the end, as in the SDK's span), their events
the place in its events; a test compares the exports of random spans both ways, byte for byte.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry import trace

#: Keys of a span's attributes, and names of its events, that stand for deferred facts: no
#: caller's (OpenTelemetry's keys and names are printable).
DEFERRED = "\x00retd.deferred"

Facts = tuple[Any, ...]
Event = tuple[str, Any, int]  # name, attributes (or deferred facts), wall-clock ns


def expand(facts: Facts) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """The facts' attributes (unset ones left out) and stage events (name, wall-clock ns).
    The facts are the 24 this unpacks, in its order (server/telemetry.py `_facts` makes
    them)."""
    (
        model, model_version_name, kind, device, output_tokens, finish_reason,
        queue_s, first_token_s, compute_s, submitted_ns, batch_min, batch_max,
        batch_mean, priority, version, candidates, max_tokens, temperature, top_k,
        top_p, seed, device_allocated_bytes, device_peak_bytes, rss_bytes,
    ) = facts  # fmt: skip
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "generate_content",
        "gen_ai.request.model": model,
        "gen_ai.response.model": f"{model}@{model_version_name}",
        "gen_ai.usage.output_tokens": output_tokens,
        "gen_ai.response.finish_reasons": [finish_reason],
        "retd.model.kind": kind,
        "retd.model.device": device,
        "retd.queue_ms": queue_s * 1e3,
        "retd.time_to_first_token_ms": first_token_s * 1e3,
        "retd.compute_ms": compute_s * 1e3,
        "retd.total_ms": (queue_s + compute_s) * 1e3,
        "retd.batch_size.min": batch_min,
        "retd.batch_size.max": batch_max,
        "retd.batch_size.mean": batch_mean,
        "retd.priority": priority,
        "retd.model.version": version,
        "retd.candidates": candidates,
        "gen_ai.request.max_tokens": max_tokens,
        "gen_ai.request.temperature": temperature,
        "gen_ai.request.top_k": top_k,
        "gen_ai.request.top_p": top_p,
        "gen_ai.request.seed": seed,
        "retd.memory.device_allocated_bytes": device_allocated_bytes,
        "retd.memory.device_peak_bytes": device_peak_bytes,
        "retd.memory.rss_bytes": rss_bytes,
    }
    events = [
        ("queued", submitted_ns),
        ("admitted", submitted_ns + int(queue_s * 1e9)),
        ("first_token", submitted_ns + int(first_token_s * 1e9)),
        ("finished", submitted_ns + int((queue_s + compute_s) * 1e9)),
    ]
    return {k: v for k, v in attributes.items() if v is not None}, events


def annotate(span: trace.Span, facts: Facts) -> None:
    """The facts onto a recording span: kept as they are by a span that defers them (a
    `RecordedSpan`), expanded at once onto any other."""
    defer = getattr(span, "defer", None)
    if defer is not None:
        defer(facts)
        return
    attributes, events = expand(facts)
    span.set_attributes(attributes)
    for name, timestamp in events:
        span.add_event(name, timestamp=timestamp)


def expand_record(
    attributes: Mapping[str, Any], events: list[Event]
) -> tuple[dict[str, Any], list[Event]]:
    """A span record's attributes and events with every deferred tuple expanded in place
    (an event that stands for facts carries them where its attributes would be)."""
    expansions: dict[int, tuple[dict[str, Any], list[tuple[str, int]]]] = {}

    def expanded(facts: Facts) -> tuple[dict[str, Any], list[tuple[str, int]]]:
        found = expansions.get(id(facts))
        if found is None:
            found = expansions[id(facts)] = expand(facts)
        return found

    flat: dict[str, Any] = {}
    for key, value in attributes.items():  # a key set again moves to the end, as in the SDK's
        if key.startswith(DEFERRED):
            facts = expanded(value)[0]
            if not flat.keys().isdisjoint(facts):
                for name in facts:
                    flat.pop(name, None)
            flat.update(facts)
        else:
            flat.pop(key, None)
            flat[key] = value
    stages: list[Event] = []
    for name, event_attributes, timestamp in events:
        if name == DEFERRED:
            stages.extend((stage, {}, when) for stage, when in expanded(event_attributes)[1])
        else:
            stages.append((name, event_attributes, timestamp))
    return flat, stages
