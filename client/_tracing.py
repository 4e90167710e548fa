"""W3C trace context on outgoing calls, when OpenTelemetry is installed.

The client does not depend on OpenTelemetry. Where the caller's process has it (and a span
is current), every call carries a `traceparent` (and `tracestate`, baggage) header, so the
caller's trace continues into the daemon; without it, calls carry none.
"""

from __future__ import annotations

from collections.abc import Sequence

try:
    from opentelemetry import propagate
except ImportError:  # pragma: no cover - depends on the caller's environment
    propagate = None  # type: ignore[assignment]

Metadata = tuple[tuple[str, str], ...]


def with_trace_context(metadata: Sequence[tuple[str, str]] | None) -> Metadata | None:
    """`metadata` plus the current trace context's headers (None stays None when there is
    no context to send)."""
    if propagate is None:
        return tuple(metadata) if metadata else None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return tuple(metadata) if metadata else None
    return (*(metadata or ()), *carrier.items())
