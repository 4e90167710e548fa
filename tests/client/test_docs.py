"""The examples in the client's docstrings run. The client's own examples run against the
shared test server (tests/conftest.py: the seeded, untrained ret_v21) with these names:
`client`, `address`, `embedding`, `matrix` (two rows), `e1`, `e2`. The few that need a
phrase bank or a model repository are marked +SKIP; tests/client/test_repository_client.py
and tests/server/phrase_bank/ run those calls."""

from __future__ import annotations

import doctest
import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from retd.client import Client, Hybrid
from tests.client.conftest import embeddings

MODULES = [
    "retd.client",
    "retd.client.async_client",
    "retd.client.cli",
    "retd.client.client",
    "retd.client.convert",
    "retd.client.errors",
    "retd.client.inputs",
    "retd.client.types",
    "retd.client._security",
]


@pytest.fixture(scope="module")
def namespace(server: Any) -> Iterator[dict[str, Any]]:
    rows = embeddings(3, seed=11)
    with Client(server.address, timeout=30) as client:
        yield {
            "np": np,
            "Client": Client,
            "Hybrid": Hybrid,
            "client": client,
            "address": server.address,
            "embedding": rows[0],
            "matrix": rows[1:],
            "e1": rows[1],
            "e2": rows[2],
        }


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str, namespace: dict[str, Any]) -> None:
    result = doctest.testmod(
        importlib.import_module(name), extraglobs=namespace, optionflags=doctest.ELLIPSIS
    )
    assert result.failed == 0
    if name == "retd.client.client":  # the examples run; only the few above are skipped
        assert result.attempted >= 20, result
