"""Fixtures of the client tests: a fake retd server in-process (no model, no torch)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fake_decoder  # noqa: E402


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[fake_decoder.FakeDecoder, str]]:
    """(servicer, target) of a fake server running for the module's tests."""
    server, servicer, target = fake_decoder.start()
    yield servicer, target
    server.stop(None)
