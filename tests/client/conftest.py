"""Fixtures of the client tests: the real retd daemon of tests/conftest.py (`server`), and a
bounded poll for server-side state that changes a moment after a client-side action."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import pytest

from retd.client import Client, GenerateResult

T = TypeVar("T")

#: The served model (named after the checkpoint's architecture) and its input size.
MODEL = "ret_v21"
DIM = 768


def embeddings(n: int, seed: int = 0) -> np.ndarray:
    """`n` distinct float32 embeddings (rows); the untrained model decodes each differently."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, DIM)) * np.arange(1, n + 1)[:, None]).astype(np.float32)


def poll(condition: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
    """Call `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} still false after {timeout} s")
        time.sleep(0.01)
    return value


def stop_case(
    client: Client, embedding: np.ndarray, n: int
) -> tuple[GenerateResult, str, int, int]:
    """(generated, stop, index, seed): a seeded `generate` whose bytes hold a printable ASCII
    `stop` first at `index` > 0, so that the same call with `stop=stop` must end there."""
    for seed in range(50):  # deterministic: the first seed that fits
        base = client.generate(embedding, max_new_tokens=n, seed=seed)
        for index, byte in enumerate(base.token_ids):
            if index > 0 and 0x21 <= byte < 0x7F and byte not in base.token_ids[:index]:
                return base, chr(byte), index, seed
    raise AssertionError("no seed gave a printable ASCII byte")


@pytest.fixture
def client(server) -> Iterator[Client]:
    """A client of the shared real server."""
    with Client(server.address, timeout=30) as c:
        yield c
