"""Which model serves requests that name none: the first generative model by name unless
--default-model says otherwise, so a phrase bank named `faq` beside `ret` does not become the
default by its name; the start-up log and ListModels say which it is. Real daemons."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from retd.client import AnswerSource, Client
from retd.model.checkpoint import init_checkpoint
from retd.model.embed import load_split
from retd.model.phrase_bank import save_phrase_bank
from tests.conftest import RunningServer, start_server

FIXTURE = Path(__file__).parents[1] / "data" / "embedded"
SPLIT = load_split(FIXTURE, "train")
TEXTS, MEMBERS = SPLIT.texts[:16], SPLIT.embeddings[:16].astype(np.float32)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of a phrase bank `faq` and a RET model `ret` (`faq` sorts first)."""
    root = tmp_path_factory.mktemp("repository")
    save_phrase_bank(root / "faq" / "1", TEXTS, MEMBERS, name="faq")
    init_checkpoint(root / "ret" / "1", seed=3)
    return root


def serving_line(server: RunningServer) -> str:
    return next(line for line in server.log().splitlines() if "retd serving" in line)


def default_of(server: RunningServer) -> tuple[str, str, AnswerSource]:
    """(ListModels' default_model, the model a Decode naming none got, its answer's source)."""
    with Client(server.address, timeout=60) as client:
        result = client.decode(MEMBERS[0], max_new_tokens=4)
        return client.default_model(), result.model, result.source


@pytest.fixture(scope="module")
def repository_server(repository: Path) -> Iterator[RunningServer]:
    server = start_server(repository, ["--model-repo", str(repository)])
    yield server
    assert server.stop() == 0, server.log()


def test_a_repository_defaults_to_its_generative_model_not_the_first_name(
    repository_server: RunningServer,
) -> None:
    assert default_of(repository_server) == ("ret", "ret", AnswerSource.GENERATED)
    line = serving_line(repository_server)
    assert "(default model ret: the first generative model by name)" in line, line
    with Client(repository_server.address, timeout=60) as client:
        assert {m.name for m in client.list_models()} == {"faq", "ret"}


def test_models_named_on_the_command_line_default_to_the_generative_one(
    repository: Path, tmp_path: Path
) -> None:
    args = [
        "--model",
        f"faq={repository / 'faq' / '1'}",
        "--model",
        f"ret={repository / 'ret' / '1'}",
    ]
    server = start_server(tmp_path, args)
    try:
        assert default_of(server) == ("ret", "ret", AnswerSource.GENERATED)
    finally:
        assert server.stop() == 0, server.log()


def test_default_model_chooses_the_bank_when_asked(repository: Path, tmp_path: Path) -> None:
    server = start_server(
        tmp_path, ["--model-repo", str(repository)], env={"RETD_DEFAULT_MODEL": "faq"}
    )
    try:
        assert default_of(server) == ("faq", "faq", AnswerSource.PHRASE_BANK)
        assert re.search(r"\(default model faq: set by --default-model\)", serving_line(server))
    finally:
        assert server.stop() == 0, server.log()


def test_with_no_generative_model_the_first_by_name_is_the_default(
    repository: Path, tmp_path: Path
) -> None:
    server = start_server(tmp_path, ["--model-repo", str(repository), "--repo-models", "faq"])
    try:
        assert default_of(server)[:2] == ("faq", "faq")
        assert "(default model faq: the first model by name; none is generative)" in (
            serving_line(server)
        )
    finally:
        assert server.stop() == 0, server.log()
