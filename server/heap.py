"""The daemon's long-lived objects and Python's cyclic garbage collector.

A full collection walks every object the collector tracks: with torch imported and a model
loaded that is ~190,000 of them, 60-70 ms of the GIL at a time on a 2-core test machine, and
under load one came every few seconds (3-4 in 15 s at 64 callers), each a pause of every call
in flight. The modules, the model and the server live as long as the daemon: `settle()`
collects once and then freezes what is left (`gc.freeze`), so that later collections walk
only the objects made since (a full one then takes ~2 ms).

It is called whenever the models loaded change (started, loaded, released) and in an engine
process once its model is ready. It unfreezes first, so the objects of a model that was
released are collected with their reference cycles rather than kept, frozen, for good.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def settle() -> None:
    """Collect everything, then freeze what is left (see the module's doc)."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    log.debug(
        "heap settled: %d objects frozen in %.0f ms",
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1e3,
    )
