"""Fixtures of the client tests: the real retd daemon of tests/conftest.py (`server`); the
bounded poll for server-side state is tests/_wait.py's."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest

from retd.client import Client, GenerateResult

#: The served model (named after the checkpoint's architecture) and its input size.
MODEL = "ret_v21"
DIM = 768


def embeddings(n: int, seed: int = 0) -> np.ndarray:
    """`n` distinct float32 embeddings (rows); the untrained model decodes each differently."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, DIM)) * np.arange(1, n + 1)[:, None]).astype(np.float32)


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class FakeStdin(io.BytesIO):
    """A binary stdin holding `data`; `tty`: whether it says it is a terminal."""

    def __init__(self, data: bytes, tty: bool = False) -> None:
        super().__init__(data)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


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
