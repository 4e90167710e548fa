"""The call gate: counts the calls in flight and, once closed for shutdown, turns new
calls away with UNAVAILABLE while the ones already accepted finish."""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

SHUTTING_DOWN = "the server is shutting down; retry on another replica"


class CallGate:
    def __init__(self) -> None:
        self._open = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def open(self) -> bool:
        return self._open

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def enter(self) -> bool:
        """Admit a call; False once the gate is closed."""
        if not self._open:
            return False
        self._in_flight += 1
        self._idle.clear()
        return True

    def exit(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def close(self, timeout: float) -> bool:
        """Turn new calls away and wait up to `timeout` s for those in flight; True if none
        is left."""
        self._open = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class Gated(Protocol):
    gate: CallGate


S = TypeVar("S", bound=Gated)
Method = Callable[..., Any]


def gated(method: Method) -> Method:
    """Wrap a servicer method (coroutine or async generator) so it passes `self.gate`."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(
            self: S, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            if not self.gate.enter():
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            try:
                async for item in method(self, request, context):
                    yield item
            finally:
                self.gate.exit()

        return stream

    @functools.wraps(method)
    async def unary(self: S, request: Any, context: grpc.aio.ServicerContext) -> Awaitable[Any]:
        if not self.gate.enter():
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        try:
            return await method(self, request, context)
        finally:
            self.gate.exit()

    return unary
