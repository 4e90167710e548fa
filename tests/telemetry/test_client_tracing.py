"""The retd client continues the caller's trace into the daemon (sync and async)."""

from __future__ import annotations

import asyncio

import numpy as np
from opentelemetry.sdk.trace import TracerProvider

from retd.client import AsyncClient, Client
from tests.telemetry.conftest import InProcess

EMBEDDING = np.random.default_rng(21).standard_normal(768).astype(np.float32)


def _server_span_parent(daemon: InProcess, method: str) -> tuple[int, int]:
    (span,) = daemon.finished(1, f"retd.v1.Decoder/{method}")
    assert span.parent is not None, "the server span has no parent: the trace did not continue"
    return span.context.trace_id, span.parent.span_id


def test_client_calls_continue_the_callers_trace(daemon: InProcess) -> None:
    tracer = TracerProvider().get_tracer("caller")  # the caller's own SDK, not the daemon's
    with Client(f"127.0.0.1:{daemon.port}", timeout=30) as client:
        with tracer.start_as_current_span("caller work") as caller:
            client.decode(EMBEDDING, max_new_tokens=4)
        context = caller.get_span_context()
        assert _server_span_parent(daemon, "Decode") == (context.trace_id, context.span_id)

        daemon.spans.clear()
        with tracer.start_as_current_span("caller stream") as caller:
            chunks = list(client.generate_stream(EMBEDDING, max_new_tokens=4, seed=1))
        assert chunks[-1].finish_reason is not None
        context = caller.get_span_context()
        assert _server_span_parent(daemon, "GenerateStream") == (context.trace_id, context.span_id)

        daemon.spans.clear()
        client.decode(EMBEDDING, max_new_tokens=4)  # no current span: a trace of its own
        (span,) = daemon.finished(1, "retd.v1.Decoder/Decode")
        assert span.parent is None


def test_async_client_calls_continue_the_callers_trace(daemon: InProcess) -> None:
    tracer = TracerProvider().get_tracer("caller")

    async def main() -> tuple[int, int]:
        async with AsyncClient(f"127.0.0.1:{daemon.port}", timeout=30) as client:
            with tracer.start_as_current_span("caller work") as caller:
                await client.generate(EMBEDDING, max_new_tokens=4, seed=2)
            context = caller.get_span_context()
            return context.trace_id, context.span_id

    expected = asyncio.run(main())
    assert _server_span_parent(daemon, "Generate") == expected
