"""The call gate: counts the calls in flight and, once closed for shutdown, turns new
calls away with UNAVAILABLE while the ones already accepted finish."""

from __future__ import annotations

import asyncio

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
