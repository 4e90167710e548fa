"""OTLP span export from a process of its own (`--traces-exporter otlp`).

Encoding spans as OTLP protobuf is Python work: ~0.3 ms for one of retd's call spans (30
attributes, 4 events) on a 2-core test machine. Done in the daemon, by the batch span
processor's thread, it held the GIL the event loop needs, and tracing every call cost ~18%
of the requests/s at 64 callers, where spans recorded but not exported cost ~1%.

So the daemon's batch span processor hands each batch to `ProcessSpanExporter`, which copies
the spans into plain tuples (`span_record`; the daemon's spans for this exporter are such
records from the start: server/span_records.py) and pickles them down a pipe
(server/frames.py) to a child, `python -m retd.server.span_export`. The child encodes them
(server/otlp_encode.py) and exports them with OpenTelemetry's own OTLP exporter, made as the
daemon would make it: the endpoint given, and the standard `OTEL_EXPORTER_OTLP_*`
environment (headers, certificates, compression, timeout), which the child inherits. The
child runs at the lowest CPU priority (`lower_priority`) so that on a busy machine serving
comes first. A flush or shutdown in the daemon waits until the child has exported everything
sent before it. A child that dies is started again at the next batch; the batch it had is
lost and logged, as a failed export is.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from retd.server.frames import grow_pipe, read_frame, write_frame
from retd.server.span_records import RecordedSpan, context_record

log = logging.getLogger(__name__)

_FLUSH_TIMEOUT_S = 30.0
#: The child's niceness over the daemon's, where the idle policy is not to be had: on a
#: saturated machine the export yields the CPU to serving (spans wait in the pipe and the batch
#: processor's queue, ~3,700 of them, and are dropped by the processor, with its warning, only
#: when both are full).
NICE = 10


def lower_priority() -> None:
    """The child's CPU priority: Linux's idle policy (`SCHED_IDLE`: it runs only on CPU time no
    other task wants, and yields it at once when one does), else `NICE` more than the
    daemon's. A niced child still took its share of a core from the decode worker: at 64
    callers on 2 cores the worker waited for its CPU 5.7-6.1% of the time with tracing on
    (1.0-1.7% off), 2.8-3.7% with the child idle."""
    os.nice(NICE)
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or a sandbox refusing it
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def span_record(span: ReadableSpan) -> tuple[Any, ...]:
    """What the child needs of a finished span, in builtins only (cheap to pickle); a
    `RecordedSpan` is that record already."""
    if isinstance(span, RecordedSpan):
        return span.record()
    assert span.context is not None
    scope = span.instrumentation_scope
    return (
        span.name,
        context_record(span.context),
        None if span.parent is None else context_record(span.parent),
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        [(e.name, dict(e.attributes or {}), e.timestamp) for e in span.events],
        [(context_record(k.context), dict(k.attributes or {})) for k in span.links],
        span.status.status_code.value,
        span.status.description,
        None if scope is None else (scope.name, scope.version, scope.schema_url),
    )


class ProcessSpanExporter(SpanExporter):
    """A SpanExporter whose OTLP export runs in a child process (see the module's doc)."""

    def __init__(self, endpoint: str | None, insecure: bool) -> None:
        self._args = ["--insecure"] if insecure else []
        if endpoint is not None:
            self._args += ["--endpoint", endpoint]
        self._lock = threading.Lock()  # one batch, flush or shutdown on the pipe at a time
        self._child: subprocess.Popen[bytes] | None = None
        self._closed = False

    def _started(self) -> subprocess.Popen[bytes]:
        if self._child is None or self._child.poll() is not None:
            command = [sys.executable, "-m", "retd.server.span_export", *self._args]
            self._child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert self._child.stdin is not None
            grow_pipe(self._child.stdin.fileno())
        return self._child

    def _send(self, message: tuple[Any, ...], *, answer_within: float | None = None) -> bool:
        """Send `message`; with `answer_within`, wait that many seconds at most for the
        child to say it has exported everything before it."""
        try:
            child = self._started()
            assert child.stdin is not None and child.stdout is not None
            write_frame(child.stdin.fileno(), message)
            if answer_within is None:
                return True
            if not select.select([child.stdout], [], [], answer_within)[0]:
                log.warning("the span exporter process did not flush in %.1f s", answer_within)
                return False
            return bool(read_frame(child.stdout.fileno()) == "done")
        except (OSError, EOFError) as exc:
            log.warning("the span exporter process failed (%r): spans lost", exc)
            return False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        resource = spans[0].resource
        message = ("spans", dict(resource.attributes), resource.schema_url)
        with self._lock:
            if self._closed:
                return SpanExportResult.FAILURE
            sent = self._send((*message, [span_record(s) for s in spans]))
        return SpanExportResult.SUCCESS if sent else SpanExportResult.FAILURE

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            return self._closed or self._send(("flush",), answer_within=timeout_millis / 1e3)

    def shutdown(self) -> None:
        """Export what was sent, within _FLUSH_TIMEOUT_S (then the child is killed)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            child = self._child
            if child is None or child.poll() is not None:
                return
            self._send(("close",), answer_within=_FLUSH_TIMEOUT_S)
            try:
                child.wait(timeout=_FLUSH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """The child: spans from stdin, exported by OTLP until stdin closes or says `close`."""
    from retd.server.otlp_encode import Batch, RecordExporter

    parser = argparse.ArgumentParser(prog="python -m retd.server.span_export")
    parser.add_argument("--endpoint")
    parser.add_argument("--insecure", action="store_true")
    args = parser.parse_args(argv)
    lower_priority()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    exporter = RecordExporter(endpoint=args.endpoint, insecure=args.insecure)
    requests, replies = sys.stdin.fileno(), sys.stdout.fileno()
    resource = Resource({})
    try:
        while True:
            try:
                message = read_frame(requests)
            except EOFError:
                break
            if message[0] == "spans":
                _, attributes, schema_url, records = message
                if (attributes, schema_url) != (dict(resource.attributes), resource.schema_url):
                    resource = Resource(attributes, schema_url)  # once: the daemon has one
                exporter.export(Batch(resource, records))  # type: ignore[arg-type]
            else:  # flush or close: everything before it has been exported
                write_frame(replies, "done")
                if message[0] == "close":
                    break
    finally:
        exporter.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
