"""The examples in the client's docstrings run, every one of them (no +SKIP in any client
module). They run against a real daemon with these names: `client`, `address`, `embedding`,
`matrix` (two rows), `e1`, `e2`. The daemon is the shared test server (tests/conftest.py: the
seeded, untrained ret_v21), except for the modules of REPOSITORY_EXAMPLES, whose examples also
call a model repository and a phrase bank: each runs against a `repository_server` of its own
(a fresh daemon, so that no module sees what another left), which serves the same ret_v21 as
its default model beside them. doctest runs a module's docstrings in name order, so in
retd.client.client Client.load_model (which loads ret 1) runs before Client.model_info (which
describes it) and Client.unload_model (which unloads it), and Client.decode and
Client.list_versions see ret 1 on disk only; in retd.client.async_client
AsyncClient.list_versions sees ret 1 on disk, then AsyncClient.load_model loads it and
AsyncClient.unload_model unloads it."""

from __future__ import annotations

import doctest
import importlib
import inspect
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retd.client import Client, Hybrid
from tests.client.conftest import DIM, embeddings
from tests.conftest import RunningServer, start_server

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


#: The modules whose examples run against a `repository_server` (one each).
REPOSITORY_EXAMPLES = {"retd.client", "retd.client.async_client", "retd.client.client"}
#: How many examples each module runs at least: all it has, none skipped.
EXAMPLES = {
    "retd.client": 5,
    "retd.client.async_client": 12,
    "retd.client.cli": 0,
    "retd.client.client": 34,
    "retd.client.convert": 7,
    "retd.client.errors": 4,
    "retd.client.inputs": 2,
    "retd.client.types": 6,
    "retd.client._security": 1,
}
#: What the phrase bank "faq" holds: its first phrase sits at cosine 0.97 from `embedding`.
FAQ = [
    "You can reset your password from the sign-in page.",
    "Our office is open from nine to five on weekdays.",
    "Refunds take three to five business days.",
]
ROWS = embeddings(3, seed=11)  # embedding, then matrix (= e1, e2)


def near(vector: np.ndarray, cosine: float, seed: int) -> np.ndarray:
    """A vector at `cosine` from `vector`: its direction tilted towards a random orthogonal."""
    unit = vector / np.linalg.norm(vector)
    other = np.random.default_rng(seed).standard_normal(DIM)
    other -= (other @ unit) * unit
    return cosine * unit + np.sqrt(1 - cosine**2) * other / np.linalg.norm(other)


@pytest.fixture
def repository_server(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path
) -> Iterator[RunningServer]:
    """A daemon serving a model repository (MODEL_REPO/<model>/<version>/): ret_v21/1 (a copy
    of the shared server's checkpoint: the default model, so the other examples answer as
    there), ret/1 and ret/2 (ret 2 serves, ret 1 is on disk) and faq/1, a phrase bank of FAQ
    whose first phrase is at cosine 0.97 from `embedding`. Loopback, no tokens: admin calls
    are allowed (a token sent is not checked). One per test: the admin examples of each
    module start from this state."""
    from retd.model.checkpoint import init_checkpoint
    from retd.model.phrase_bank import save_phrase_bank

    root = tmp_path_factory.mktemp("doc_repository")
    repo = root / "repo"
    shutil.copytree(checkpoint, repo / "ret_v21" / "1")
    init_checkpoint(repo / "ret" / "1", seed=1)
    init_checkpoint(repo / "ret" / "2", seed=2)
    rng = np.random.default_rng(5)
    bank = np.stack([near(ROWS[0], 0.97, seed=6), *rng.standard_normal((len(FAQ) - 1, DIM))])
    save_phrase_bank(repo / "faq" / "1", FAQ, bank, name="faq")
    args = ["--model-repo", str(repo), "--default-model", "ret_v21"]
    server = start_server(root, args)
    yield server
    assert server.stop() == 0, server.log()


def examples_namespace(address: str, client: Client) -> dict[str, Any]:
    return {
        "np": np,
        "Client": Client,
        "Hybrid": Hybrid,
        "client": client,
        "address": address,
        "embedding": ROWS[0],
        "matrix": ROWS[1:],
        "e1": ROWS[1],
        "e2": ROWS[2],
    }


@pytest.fixture(scope="module")
def namespace(server: Any) -> Iterator[dict[str, Any]]:
    with Client(server.address, timeout=30) as client:
        yield examples_namespace(server.address, client)


@pytest.fixture
def repository_namespace(repository_server: RunningServer) -> Iterator[dict[str, Any]]:
    with Client(repository_server.address, timeout=300) as client:
        yield examples_namespace(repository_server.address, client)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str, request: pytest.FixtureRequest) -> None:
    fixture = "repository_namespace" if name in REPOSITORY_EXAMPLES else "namespace"
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, extraglobs=request.getfixturevalue(fixture), optionflags=doctest.ELLIPSIS
    )
    assert result.failed == 0
    assert result.attempted >= EXAMPLES[name], result  # every example runs: none is skipped
    assert "+SKIP" not in inspect.getsource(module)


def test_every_example_counted() -> None:
    """EXAMPLES names every module tested, and its total is every example they have."""
    assert set(EXAMPLES) == set(MODULES)
    assert sum(EXAMPLES.values()) >= 71


def test_no_example_skipped() -> None:
    """No client module, private ones included, skips an example."""
    package = Path(importlib.import_module("retd.client").__file__ or "").parent
    sources = sorted(package.glob("*.py"))
    assert len(sources) >= len(MODULES)
    skipping = [path.name for path in sources if "+SKIP" in path.read_text()]
    assert skipping == []
