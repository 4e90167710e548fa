"""The examples in the client's docstrings run (those needing a server are marked +SKIP)."""

from __future__ import annotations

import doctest
import importlib

import pytest

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


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
