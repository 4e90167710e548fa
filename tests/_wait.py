"""The tests' one bounded poll: for state a daemon, an engine or a channel reports a moment
after the action that changes it (a drained queue, a health status, an access-log line).

Use it only where nothing can be awaited: a call's end, a future or an event is better."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

#: How long a poll waits by default: generous, since every poll ends as soon as it holds.
POLL_TIMEOUT_S = 15.0
#: Between two looks at the condition.
POLL_INTERVAL_S = 0.01

What = str | Callable[[], str]


def _failure(what: What, timeout: float) -> AssertionError:
    described = what() if callable(what) else what
    return AssertionError(f"{described} still false after {timeout} s")


def poll(
    condition: Callable[[], T],
    timeout: float = POLL_TIMEOUT_S,
    what: What = "condition",
    *,
    interval: float = POLL_INTERVAL_S,
) -> T:
    """Call `condition` until it returns something truthy, and return that; fail with an
    AssertionError naming `what` (a string, or a function that describes the last state)
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise _failure(what, timeout)
        time.sleep(interval)
    return value


async def apoll(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float = POLL_TIMEOUT_S,
    what: What = "condition",
    *,
    interval: float = POLL_INTERVAL_S,
) -> T:
    """:func:`poll` for the event loop: `condition` may be a plain function or return an
    awaitable (a coroutine function's call); the loop runs between looks."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise _failure(what, timeout)
        await asyncio.sleep(interval)
