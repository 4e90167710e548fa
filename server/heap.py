"""The daemon's long-lived objects and Python's cyclic garbage collector.

A full collection walks every object the collector tracks: with torch imported and a model
loaded that is ~190,000 of them, 60-110 ms of the GIL at a time on a 2-core test machine,
and under load one came every few seconds (3-4 in 10 s at 64 callers), each a pause of every
call in flight. The modules, the model and the server live as long as the daemon: `settle()`
collects once and then freezes what is left (`gc.freeze`), so that later collections walk
only the objects made since (a full one then takes ~2 ms).

It is called when a model loads and in an engine process once its model is ready, and a
moment after a model is released (`released()`): settling unfreezes first, so the released
model's objects are collected with their reference cycles rather than kept, frozen, for good.
`observe_collections` counts the collector's runs and pauses (the `retd.gc.*` metrics).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

log = logging.getLogger(__name__)


#: Allocations (less deallocations) between two collections of the youngest generation:
#: Python's 700 made ~55 of them a second at 64 callers, ~150 ms of the GIL in 10 s with
#: the middle generation's; 7,000 made ~2 a second, ~45 ms, the longest pause ~4 ms.
YOUNG_THRESHOLD = 7000


def settle() -> None:
    """Collect everything, then freeze what is left (see the module's doc); collect the
    youngest generation every `YOUNG_THRESHOLD` allocations."""
    started = time.perf_counter()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    log.debug(
        "heap settled: %d objects frozen in %.0f ms",
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1e3,
    )


#: After a release, how long `released` waits to settle: the engine's last references (the
#: executor thread that ran its close) let go within moments.
REFREEZE_AFTER_S = 1.0


def released() -> None:
    """A model was released: settle a moment later, once its last references are gone (its
    objects, reference cycles too, are collected then). Call on the event loop."""
    asyncio.get_running_loop().call_later(REFREEZE_AFTER_S, settle)


def observe_collections(meter: Meter) -> Callable[[], None]:
    """`retd.gc.collections` and `retd.gc.pause` (seconds), by generation, on `meter`: the
    collector's runs in this process from now on, counted by a `gc.callbacks` hook (plain
    arithmetic: a collection can start in the middle of anything, a lock held) and read when
    the metrics are collected. Returns the function that removes the hook."""
    totals = {generation: [0, 0.0] for generation in range(3)}  # runs, seconds
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            total = totals[info["generation"]]
            total[0] += 1
            total[1] += time.perf_counter() - started[0]

    def read(field: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(t[field], {"generation": g}) for g, t in totals.items()]

        return callback

    meter.create_observable_counter(
        "retd.gc.collections", [read(0)], unit="{collection}",
        description="Runs of Python's cyclic garbage collector in the daemon's process",
    )  # fmt: skip
    meter.create_observable_counter(
        "retd.gc.pause", [read(1)], unit="s",
        description="Time the daemon's process spent in garbage collections (the GIL held)",
    )  # fmt: skip
    gc.callbacks.append(timed)
    return lambda: gc.callbacks.remove(timed)
