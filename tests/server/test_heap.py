"""The daemon's long-lived objects are frozen out of the garbage collector's way
(server/heap.py), and a model that is released is collected all the same, its reference
cycles too."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from retd.server import heap
from retd.server.app import load_engine
from retd.server.config import ModelSettings, ModelSpec
from retd.server.engine import ServingEngine
from retd.server.repository import ModelRegistry
from tests._wait import poll


class Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.itself = self


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """Whatever a test froze goes back to the collector, and its thresholds are restored
    (pytest's process goes on)."""
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_after_settling_the_young_generation_is_collected_less_often() -> None:
    runs = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 0:
            runs.append(1)

    def allocate() -> int:
        runs.clear()
        gc.callbacks.append(count)
        try:
            kept = [[i] for i in range(5000)]  # 5,000 containers that survive
        finally:
            gc.callbacks.remove(count)
        return len(runs) if kept else 0

    gc.set_threshold(700, 10, 10)  # Python's defaults
    assert allocate() >= 5
    heap.settle()
    assert allocate() == 0


def test_settle_freezes_what_lives_and_collects_what_died_since() -> None:
    node = Node()
    alive = weakref.ref(node)
    heap.settle()
    assert gc.get_freeze_count() > 0
    del node
    gc.collect()  # a full collection: the frozen cycle is not walked...
    assert alive() is not None
    heap.settle()  # ...the next settle unfreezes first, and collects it
    assert alive() is None


def test_a_released_models_engine_is_collected_with_its_cycles(checkpoint: Path) -> None:
    """A model loaded (its objects frozen), then unloaded while the admin's answer still
    holds its version: the engine goes, though a reference cycle runs through it, and the
    heap is frozen again."""
    engines: list[weakref.ref[ServingEngine]] = []

    def load(spec: ModelSpec) -> ServingEngine:
        engine = load_engine(spec)
        engine.__dict__["loop_back"] = engine  # a reference cycle through the engine
        engines.append(weakref.ref(engine))
        return engine

    def collected() -> bool:
        gc.collect()  # walks only what is not frozen
        return engines[0]() is None

    async def load_and_unload() -> list[object]:
        spec = ModelSpec("m", checkpoint, ModelSettings(device="cpu"))
        models = ModelRegistry([spec], load)
        await models.start()
        assert gc.get_freeze_count() > 0 and engines[0]() is not None
        released = await models.unload("m")
        await asyncio.to_thread(poll, collected, what="the released engine collected")
        assert gc.get_freeze_count() > 0  # settled again: collected, then frozen
        await models.close()
        return list(released)

    released = asyncio.run(load_and_unload())
    assert [entry.name for entry in released] == ["m"]  # type: ignore[attr-defined]
