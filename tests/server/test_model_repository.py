"""A model repository served by the real daemon: the newest version of every model, version
routing, the ModelRepository admin service (List, Load, Unload), failed loads reported while
the rest serves, health following load state, and hot reload under load with no failed call
(`--watch`). Called through stubs generated from the .proto files and the health stub."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retd.model.checkpoint import CARD_FILE, DEFAULT_CHECKPOINT, init_checkpoint, load_checkpoint
from retd.model.embed import load_split
from retd.model.generation import SamplingParams, generate
from retd.model.model import config_for
from retd.model.phrase_bank import save_phrase_bank
from retd.server.repository import fingerprint, scan_repository
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from retd.v1 import repository_pb2 as admin_pb
from retd.v1 import repository_pb2_grpc as admin_grpc
from tests._wait import poll
from tests.conftest import RunningServer, start_server

SPLIT = load_split(Path(__file__).parents[1] / "data" / "embedded", "train")
QUERIES = SPLIT.embeddings[:6].astype(np.float32)  # real all-mpnet-base-v2 embeddings
MAX_NEW_TOKENS = 24
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def as_pb(values: np.ndarray) -> pb.Embedding:
    return pb.Embedding(raw=pb.RawTensor(data=values.astype("<f4").tobytes(), shape=[768]))


def greedy_texts(checkpoint: Path) -> list[str]:
    """What the model in `checkpoint` decodes for each query, computed here without a server."""
    model = load_checkpoint(checkpoint).model
    params = [SamplingParams(MAX_NEW_TOKENS)] * len(QUERIES)
    return [r.text for r in generate(model, torch.from_numpy(QUERIES), params)]


def publish(staging: Path, destination: Path) -> None:
    """Put a finished version directory in place at once (how a repository is updated)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(destination)


def rows(admin: admin_grpc.ModelRepositoryStub, model: str = "") -> dict[tuple[str, int], Any]:
    listing = admin.List(admin_pb.RepositoryListRequest(model=model), timeout=30)
    return {(m.name, m.version): m for m in listing.models}


#: Polls of the daemon's own reports (List, health) for a repository change: a load included.
POLL_S = 60.0


def health_of(channel: grpc.Channel, service: str) -> int:
    """The health a probe sees; SERVICE_UNKNOWN for a name the daemon never heard of."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


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


# ---- a repository served as it is ----------------------------------------------------------


@dataclass
class Repository:
    root: Path
    expected: dict[int, list[str]]  # version of "ret" -> its greedy texts for QUERIES


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    root = tmp_path_factory.mktemp("model_repo")
    init_checkpoint(root / "ret" / "1", seed=11)
    shutil.copytree(DEFAULT_CHECKPOINT, root / "ret" / "2")  # the trained RET v2.1
    save_phrase_bank(root / "bank" / "1", SPLIT.texts[:64], SPLIT.embeddings[:64], name="bank")
    (root / "bank" / "serving.toml").write_text("max_batch_size = 4\nmax_queue_size = 100\n")
    # Three ways a version fails to load; each is reported and the others serve.
    (root / "unknown_kind" / "1").mkdir(parents=True)
    card = json.loads((root / "ret" / "1" / CARD_FILE).read_text())
    (root / "unknown_kind" / "1" / CARD_FILE).write_text(json.dumps({**card, "kind": "oracle"}))
    corrupt = shutil.copytree(root / "ret" / "1", root / "corrupt" / "1")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # A broken newest version: the next newest serves instead.
    shutil.copytree(root / "ret" / "1", root / "fallback" / "1")
    shutil.copytree(corrupt, root / "fallback" / "2")
    mismatch = shutil.copytree(root / "ret" / "1", root / "mismatch" / "1")
    shutil.copytree(root / "ret" / "1", root / "bad_settings" / "1")
    (root / "bad_settings" / "serving.toml").write_text("max_batch_size = 0\n")
    card["config"]["n_layer"] += 1
    (mismatch / CARD_FILE).write_text(json.dumps(card))
    expected = {1: greedy_texts(root / "ret" / "1"), 2: greedy_texts(root / "ret" / "2")}
    assert expected[1] != expected[2], "the two versions must answer differently to tell apart"
    return Repository(root, expected)


@pytest.fixture(scope="module")
def served(repository: Repository) -> Iterator[RunningServer]:
    server = start_server(
        repository.root, ["--model-repo", str(repository.root), "--default-model", "ret"]
    )
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def channel(served: RunningServer) -> Iterator[grpc.Channel]:
    with served.channel() as channel:
        yield channel


def decode(stub: pb_grpc.DecoderStub, index: int, version: int = 0, model: str = "ret") -> Any:
    request = pb.DecodeRequest(
        model=model, version=version, embedding=as_pb(QUERIES[index]), max_new_tokens=MAX_NEW_TOKENS
    )
    return stub.Decode(request, timeout=60)


def test_the_newest_version_of_each_model_serves_and_failures_are_listed_with_reasons(
    channel: grpc.Channel, repository: Repository, served: RunningServer
) -> None:
    admin = admin_grpc.ModelRepositoryStub(channel)
    listing = rows(admin)
    state = {key: admin_pb.ModelState.Name(row.state) for key, row in listing.items()}
    assert state == {
        ("bad_settings", 1): "MODEL_STATE_FAILED",
        ("bank", 1): "MODEL_STATE_READY",
        ("corrupt", 1): "MODEL_STATE_FAILED",
        ("fallback", 1): "MODEL_STATE_READY",
        ("fallback", 2): "MODEL_STATE_FAILED",
        ("mismatch", 1): "MODEL_STATE_FAILED",
        ("ret", 1): "MODEL_STATE_AVAILABLE",
        ("ret", 2): "MODEL_STATE_READY",
        ("unknown_kind", 1): "MODEL_STATE_FAILED",
    }
    assert listing[("ret", 2)].serving and listing[("ret", 2)].kind == "ret"
    assert listing[("bank", 1)].kind == "phrase_bank"
    assert "oracle" in listing[("unknown_kind", 1)].reason
    assert "model.safetensors" in listing[("corrupt", 1)].reason
    missing = f"is missing tensor(s): blocks.{config_for('ret_v21').n_layer}."  # one block more
    assert missing in listing[("mismatch", 1)].reason
    assert "bad_settings/serving.toml.max_batch_size: expected an integer >= 1, got 0" in (
        listing[("bad_settings", 1)].reason
    )
    for name in ("unknown_kind", "corrupt", "mismatch", "bad_settings"):
        assert f"model {name} version 1 failed to load" in served.log()
        assert health_of(channel, name) == NOT_SERVING
    assert health_of(channel, "ret") == SERVING and health_of(channel, "bank") == SERVING
    assert listing[("fallback", 1)].serving and health_of(channel, "fallback") == SERVING
    assert "cannot read" in listing[("fallback", 2)].reason

    stub = pb_grpc.DecoderStub(channel)
    for index in range(len(QUERIES)):
        answer = decode(stub, index)
        assert (answer.model, answer.version) == ("ret", 2)
        assert answer.text == repository.expected[2][index]
    models = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert {(m.name, m.repository_version, m.serving) for m in models.models} == {
        ("ret", 2, True),
        ("bank", 1, True),
        ("fallback", 1, True),
    }
    assert models.default_model == "ret"
    loads = {m.name: (m.load.max_batch_size, m.load.max_queue_size) for m in models.models}
    assert loads["bank"] == (4, 100) and loads["ret"] == (32, 1024)  # its serving.toml, or not


def test_a_failed_model_answers_not_found_with_its_reason(channel: grpc.Channel) -> None:
    stub = pb_grpc.DecoderStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        decode(stub, 0, model="corrupt")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'corrupt' is not serving (version 1: cannot read" in raised.value.details()


def test_load_pins_an_older_version_beside_the_newest_and_unload_releases_it(
    channel: grpc.Channel, repository: Repository, served: RunningServer
) -> None:
    stub = pb_grpc.DecoderStub(channel)
    admin = admin_grpc.ModelRepositoryStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        decode(stub, 0, version=1)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "has no version 1 loaded; loaded versions: [2]" in raised.value.details()

    loaded = admin.Load(admin_pb.LoadModelRequest(model="ret", version=1), timeout=120)
    assert loaded.status.state == admin_pb.MODEL_STATE_READY and not loaded.status.serving
    for index in range(len(QUERIES)):
        old, new = decode(stub, index, version=1), decode(stub, index)
        assert (old.version, old.text) == (1, repository.expected[1][index])
        assert (new.version, new.text) == (2, repository.expected[2][index])
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="ret", version=1), timeout=30)
    assert (info.repository_version, info.serving, info.trained) == (1, False, False)

    unloaded = admin.Unload(admin_pb.UnloadModelRequest(model="ret", version=1), timeout=120)
    assert [(u.name, u.version) for u in unloaded.unloaded] == [("ret", 1)]
    assert rows(admin, "ret")[("ret", 1)].state == admin_pb.MODEL_STATE_AVAILABLE
    assert "model ret version 1 released" in served.log()
    with pytest.raises(grpc.RpcError) as raised:
        decode(stub, 0, version=1)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert decode(stub, 0).version == 2


def test_admin_errors_name_the_field_and_what_was_expected(channel: grpc.Channel) -> None:
    admin = admin_grpc.ModelRepositoryStub(channel)
    cases = [
        (admin.Load, admin_pb.LoadModelRequest(), grpc.StatusCode.INVALID_ARGUMENT, "model: empty"),
        (
            admin.Load,
            admin_pb.LoadModelRequest(model="nope"),
            grpc.StatusCode.NOT_FOUND,
            "'nope' has no version in the repository",
        ),
        (
            admin.Load,
            admin_pb.LoadModelRequest(model="ret", version=7),
            grpc.StatusCode.NOT_FOUND,
            "has no version 7 in",
        ),
        (
            admin.Load,
            admin_pb.LoadModelRequest(model="unknown_kind"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "'unknown_kind' version 1 failed to load",
        ),
        (
            admin.Unload,
            admin_pb.UnloadModelRequest(model="ret", version=9),
            grpc.StatusCode.NOT_FOUND,
            "version: model 'ret' has no loaded version 9 to unload; its loaded versions: [2]",
        ),
        (
            admin.Unload,
            admin_pb.UnloadModelRequest(model="nope"),
            grpc.StatusCode.NOT_FOUND,
            "model: 'nope' is not loaded; loaded models: ['bank', 'fallback', 'ret']",
        ),
    ]
    for method, request, code, message in cases:
        with pytest.raises(grpc.RpcError) as raised:
            method(request, timeout=60)
        assert raised.value.code() == code, raised.value.details()
        assert message in raised.value.details(), raised.value.details()


def test_unloading_a_model_whole_turns_its_health_off_and_load_brings_it_back(
    channel: grpc.Channel,
) -> None:
    admin = admin_grpc.ModelRepositoryStub(channel)
    stub = pb_grpc.DecoderStub(channel)
    admin.Unload(admin_pb.UnloadModelRequest(model="bank"), timeout=60)
    assert health_of(channel, "bank") == NOT_SERVING
    with pytest.raises(grpc.RpcError) as raised:
        decode(stub, 0, model="bank")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    admin.Load(admin_pb.LoadModelRequest(model="bank"), timeout=60)
    assert health_of(channel, "bank") == SERVING
    assert decode(stub, 3, model="bank").text == SPLIT.texts[3]


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
def watched(tmp_path: Path) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path / "repo"
    init_checkpoint(root / "ret" / "1", seed=11)
    server = start_server(tmp_path, ["--model-repo", str(root), "--watch", "0.2"])
    yield server, root
    assert server.stop() == 0, server.log()


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
            shutil.copyfile(repository.root / "ret" / "2" / "model.safetensors", mended)
            shutil.copyfile(repository.root / "ret" / "2" / CARD_FILE, mended.parent / CARD_FILE)
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


# ---- the admin service takes any bytes --------------------------------------------------------

ADMIN_METHODS = {
    "List": admin_pb.RepositoryListRequest,
    "Load": admin_pb.LoadModelRequest,
    "Unload": admin_pb.UnloadModelRequest,
}
ADMIN_CODES = {
    "List": {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT},
    "Load": {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    },
    "Unload": {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND},
}


def _admin_inputs(method: str) -> st.SearchStrategy[bytes]:
    request = ADMIN_METHODS[method](model="zz")  # no such model: the served ones stay as they are
    if method != "List":
        request.version = 3  # type: ignore[union-attr]
    valid = request.SerializeToString()
    names = (
        st.text(max_size=40)
        .filter(lambda name: name not in ("ret", "bank"))
        .map(lambda name: ADMIN_METHODS[method](model=name).SerializeToString())
    )
    flipped = st.integers(0, len(valid) - 1).map(lambda i: valid[:i] + bytes([valid[i] ^ 0x55]))
    return st.one_of(st.binary(max_size=200), names, flipped)


@pytest.mark.parametrize("method", sorted(ADMIN_METHODS))
def test_fuzzed_admin_requests_end_with_a_status_and_the_model_keeps_serving(
    method: str, channel: grpc.Channel, repository: Repository
) -> None:
    call = channel.unary_unary(f"/retd.v1.ModelRepository/{method}")

    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(data=_admin_inputs(method))
    def run(data: bytes) -> None:
        try:
            call(data, timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
        assert code in ADMIN_CODES[method], (code, data)

    run()
    stub = pb_grpc.DecoderStub(channel)
    assert decode(stub, 2).text == repository.expected[2][2]
