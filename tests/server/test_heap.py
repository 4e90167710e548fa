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


class Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.itself = self


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """Whatever a test froze goes back to the collector (pytest's process goes on)."""
    try:
        yield
    finally:
        gc.unfreeze()


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
    holds its version: the engine goes, though a reference cycle runs through it."""
    engines: list[weakref.ref[ServingEngine]] = []

    def load(spec: ModelSpec) -> ServingEngine:
        engine = load_engine(spec)
        engine.__dict__["loop_back"] = engine  # a reference cycle through the engine
        engines.append(weakref.ref(engine))
        return engine

    async def load_and_unload() -> list[object]:
        spec = ModelSpec("m", checkpoint, ModelSettings(device="cpu"))
        models = ModelRegistry([spec], load)
        await models.start()
        frozen = gc.get_freeze_count()
        assert frozen > 0 and engines[0]() is not None
        released = await models.unload("m")
        await models.close()
        return list(released)

    released = asyncio.run(load_and_unload())
    assert [entry.name for entry in released] == ["m"]  # type: ignore[attr-defined]
    assert engines[0]() is None
