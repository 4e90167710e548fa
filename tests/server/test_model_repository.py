"""A model repository followed by the real daemon: the repository on disk (which directories
are versions, when a version's files changed), and hot reload under load with no failed call
(`--watch`): a new version takes over, a broken one is reported while the old one keeps
serving, a model whose directory appears is loaded and one whose directory goes is unloaded.
Called through stubs generated from the .proto files and the health stub. (A repository
served as it is, and its admin service: test_model_repository_admin.py.)"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from retd.model.checkpoint import CARD_FILE, init_checkpoint
from retd.model.phrase_bank import save_phrase_bank
from retd.server.versions import fingerprint, scan_repository
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from retd.v1 import repository_pb2 as admin_pb
from retd.v1 import repository_pb2_grpc as admin_grpc
from tests._wait import poll
from tests.conftest import RunningServer, start_server
from tests.server._model_repo import (
    MAX_NEW_TOKENS,
    NOT_SERVING,
    POLL_S,
    QUERIES,
    SERVING,
    SPLIT,
    Repository,
    as_pb,
    decode,
    health_of,
    make_repository,
    publish,
    rows,
)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    return make_repository(tmp_path_factory)


# ---- the repository on disk, read without a server ----------------------------------------


def test_scan_finds_positive_integer_version_directories_only(tmp_path: Path) -> None:
    for path in ("a/1", "a/2", "a/10", "a/0", "a/v3", "a/.4", "b/1", ".hidden/1"):
        (tmp_path / path).mkdir(parents=True)
    (tmp_path / "a" / "5").write_text("a file, not a version directory")
    (tmp_path / "README").write_text("not a model")
    found = scan_repository(tmp_path)
    assert {name: sorted(versions) for name, versions in found.items()} == {
        "a": [1, 2, 10],
        "b": [1],
    }
    assert found["a"][10] == tmp_path / "a" / "10"


def test_fingerprint_changes_when_a_file_is_written_added_or_removed(tmp_path: Path) -> None:
    version = tmp_path / "1"
    version.mkdir()
    (version / "weights").write_bytes(b"0123")
    first = fingerprint(version)
    assert fingerprint(version) == first
    (version / "weights").write_bytes(b"01234")
    second = fingerprint(version)
    (version / "card.json").write_text("{}")
    third = fingerprint(version)
    (version / "card.json").unlink()
    assert len({first, second, third}) == 3 and fingerprint(version) == second


# ---- hot reload: --watch under load ---------------------------------------------------------


@dataclass
class Answer:
    index: int
    issued: float
    received: float
    version: int = 0
    text: str = ""
    error: str = ""


class Load:
    """Callers decoding (unary and streaming) without pause until stopped; every answer kept."""

    def __init__(self, channel: grpc.Channel, callers: int) -> None:
        self.stub = pb_grpc.DecoderStub(channel)
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._call, args=(n,), daemon=True) for n in range(callers)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _call(self, caller: int) -> None:
        count = 0
        while not self._stop.is_set():
            index = (caller + count) % len(QUERIES)
            count += 1
            answer = Answer(index, time.monotonic(), 0.0)
            try:
                if caller % 4 == 3:  # a quarter of the callers stream their text
                    request = pb.GenerateRequest(
                        model="ret", embedding=as_pb(QUERIES[index]),
                        max_new_tokens=MAX_NEW_TOKENS, temperature=0.0,
                    )  # fmt: skip
                    chunks = list(self.stub.GenerateStream(request, timeout=60))
                    answer.text = "".join(c.text for c in chunks)
                    answer.version = chunks[-1].version
                else:
                    reply = decode(self.stub, index)
                    answer.text, answer.version = reply.text, reply.version
            except grpc.RpcError as error:
                answer.error = f"{error.code().name}: {error.details()}"
            answer.received = time.monotonic()
            with self._lock:
                self.answers.append(answer)

    def count(self, version: int) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a.version == version)


@pytest.fixture
def watched(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path / "repo"
    init_checkpoint(root / "ret" / "1", seed=11)
    engine = getattr(request, "param", "thread")  # --engine
    args = ["--model-repo", str(root), "--watch", "0.2", "--engine", engine]
    server = start_server(tmp_path, args)
    yield server, root
    assert server.stop() == 0, server.log()


@pytest.mark.parametrize("watched", ["thread", "process"], indirect=True)
def test_a_new_version_takes_over_under_load_and_no_call_fails(
    watched: tuple[RunningServer, Path], repository: Repository
) -> None:
    server, root = watched
    with server.channel() as channel:
        admin = admin_grpc.ModelRepositoryStub(channel)
        with Load(channel, callers=12) as load:
            poll(lambda: load.count(1) >= 30, POLL_S, "answers from version 1")
            staging = shutil.copytree(repository.root / "ret" / "2", root / ".staging-2")
            publish(staging, root / "ret" / "2")
            poll(lambda: load.count(2) >= 60, POLL_S, "answers from version 2")
            poll(
                lambda: rows(admin, "ret")[("ret", 1)].state == admin_pb.MODEL_STATE_AVAILABLE,
                POLL_S,
                "version 1 released",
            )
        answers = list(load.answers)
    failed = [a for a in answers if a.error]
    by_version = {v: sum(a.version == v for a in answers) for v in (1, 2)}
    print(f"hot reload under load: {len(answers)} calls, by version {by_version}, failed {failed}")
    assert not failed, failed[:5]
    wrong = [a for a in answers if a.text != repository.expected[a.version][a.index]]
    assert not wrong, wrong[:5]
    # Once a caller has had an answer from version 2, every call issued after it goes there.
    first_new = min(a.received for a in answers if a.version == 2)
    late_old = [a for a in answers if a.issued > first_new and a.version != 2]
    assert not late_old, late_old[:5]
    assert {a.version for a in answers} == {1, 2}
    log = server.log()
    assert "model ret version 2 is serving" in log and "model ret version 1 released" in log
    assert log.index("model ret version 2 is serving") < log.index("model ret version 1 released")
    if "--engine process" in " ".join(map(str, server.process.args)):
        # version 1's engine process drained and exited: only version 2's is left
        poll(lambda: len(server.children()) == 1, what="one engine process left")


def test_watch_reports_a_broken_version_keeps_the_old_one_and_loads_it_once_mended(
    watched: tuple[RunningServer, Path], repository: Repository
) -> None:
    server, root = watched
    staging = shutil.copytree(repository.root / "corrupt" / "1", root / ".staging-5")
    with server.channel() as channel:
        admin = admin_grpc.ModelRepositoryStub(channel)
        stub = pb_grpc.DecoderStub(channel)
        with Load(channel, callers=4) as load:
            publish(staging, root / "ret" / "5")
            poll(
                lambda: rows(admin, "ret")[("ret", 5)].state == admin_pb.MODEL_STATE_FAILED,
                POLL_S,
                "version 5 reported as failed",
            )
            listing = rows(admin, "ret")
            assert "cannot read" in listing[("ret", 5)].reason
            assert listing[("ret", 1)].serving and listing[("ret", 1)].state == (
                admin_pb.MODEL_STATE_READY
            )
            assert health_of(channel, "ret") == SERVING
            mended = root / "ret" / "5" / "model.safetensors"
            good = repository.root / "ret" / "2"
            if (good / "tokenizer.json").exists():  # a BPE checkpoint (the shipped one is)
                shutil.copyfile(good / "tokenizer.json", mended.parent / "tokenizer.json")
            shutil.copyfile(good / "model.safetensors", mended)
            shutil.copyfile(good / CARD_FILE, mended.parent / CARD_FILE)
            poll(lambda: load.count(5) >= 20, POLL_S, "answers from the mended version 5")
        answers = list(load.answers)
        assert not [a for a in answers if a.error], [a for a in answers if a.error][:5]
        assert all(a.text == repository.expected[{1: 1, 5: 2}[a.version]][a.index] for a in answers)
        assert decode(stub, 0).version == 5


def test_watch_loads_a_model_that_appears_and_unloads_one_whose_directory_goes(
    watched: tuple[RunningServer, Path],
) -> None:
    server, root = watched
    with server.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        staging = save_phrase_bank(
            root / ".staging-bank", SPLIT.texts[:32], SPLIT.embeddings[:32], name="bank"
        )
        publish(staging, root / "bank" / "1")
        poll(lambda: health_of(channel, "bank") == SERVING, POLL_S, "the new model serving")
        assert decode(stub, 4, model="bank").text == SPLIT.texts[4]
        shutil.rmtree(root / "bank")
        poll(lambda: health_of(channel, "bank") == NOT_SERVING, POLL_S, "the model unloaded")
        with pytest.raises(grpc.RpcError) as raised:
            decode(stub, 4, model="bank")
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert decode(stub, 0).version == 1  # the other model never noticed
