"""The call gate: counts the calls in flight and, once closed for shutdown, turns new
calls away with UNAVAILABLE while the ones already accepted finish.

Why the gate holds its last refusals (issue 7): stopping the grpc server cancels every call
grpc core has accepted from the network but not yet handed to a handler. The aio server asks
core for one call per method at a time, so under load the calls that arrived meanwhile
wait in core's queue; `grpc_server_shutdown_and_notify` zombifies them
(`KillPendingWorkLocked` -> `ZombifyPending` -> `KillZombie` -> `grpc_call_unref`, which
cancels a call that never finished) and the client sees CANCELLED, not UNAVAILABLE. So,
once the calls in flight are done, `quiesce()` holds each refused call (unanswered) until
no new call has reached the gate for `QUIET_S`: by then every caller that waits for an
answer waits on a call a handler holds, and none is on its way or queued in core. The
server is then stopped (GOAWAY, listener closed) and `release()` answers the held calls
UNAVAILABLE, after the GOAWAY on the same connection, so the callers' next calls go to a
new connection, which is refused: UNAVAILABLE too."""

from __future__ import annotations

import asyncio
import time

SHUTTING_DOWN = "the server is shutting down; retry on another replica"

# No new call for this long while refusals are held: the callers are all waiting.
QUIET_S = 0.2
# The longest the gate holds refusals waiting for that (callers that never stop calling).
HOLD_LIMIT_S = 2.0
# A held refusal is answered this long before its call's deadline (never DEADLINE_EXCEEDED).
DEADLINE_MARGIN_S = 0.05


class CallGate:
    def __init__(self) -> None:
        self._open = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._holding = False
        self._released = asyncio.Event()
        self._held = 0
        self._last_arrival = float("-inf")  # time.monotonic() of the last call at the gate

    @property
    def open(self) -> bool:
        return self._open

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def held(self) -> int:
        """Refused calls held unanswered (see `quiesce`)."""
        return self._held

    def enter(self) -> bool:
        """Admit a call; False once the gate is closed."""
        self._last_arrival = time.monotonic()
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

    async def refuse(self, time_remaining: float | None) -> None:
        """For a call the gate turned away, before it is answered UNAVAILABLE: while
        refusals are held, wait for `release()`, or until shortly before the call's deadline
        (`time_remaining` s away; None: no deadline)."""
        if not self._holding:
            return
        limit = None
        if time_remaining is not None:
            limit = time_remaining - DEADLINE_MARGIN_S
            if limit <= 0:
                return
        self._held += 1
        try:
            await asyncio.wait_for(self._released.wait(), limit)
        except TimeoutError:
            pass
        finally:
            self._held -= 1

    async def quiesce(self, limit: float, quiet: float = QUIET_S) -> bool:
        """Hold refusals (the gate must be closed) until no call has reached the gate for
        `quiet` s, at most `limit` s (and `HOLD_LIMIT_S`); True if it got quiet. Call
        `release()` after."""
        self._holding = True
        give_up = time.monotonic() + max(0.0, min(limit, HOLD_LIMIT_S))
        while True:
            now = time.monotonic()
            quiet_at = self._last_arrival + quiet
            if now >= quiet_at:
                return True
            if now >= give_up:
                return False
            await asyncio.sleep(min(quiet_at, give_up) - now)  # to the next moment to check

    def release(self) -> None:
        """Answer the held refusals (UNAVAILABLE), and refuse the next ones at once."""
        self._holding = False
        self._released.set()
