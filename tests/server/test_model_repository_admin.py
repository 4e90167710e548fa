"""A model repository served by the real daemon as it is: the newest version of every model,
version routing, the ModelRepository admin service (List, Load, Unload), failed loads
reported while the rest serves, health following load state, and the admin service taking
any bytes. Called through stubs generated from the .proto files and the health stub.
(Following the repository, hot reload under load: test_model_repository.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retd.model.model import config_for
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from retd.v1 import repository_pb2 as admin_pb
from retd.v1 import repository_pb2_grpc as admin_grpc
from tests.conftest import RunningServer, start_server
from tests.server._model_repo import (
    NOT_SERVING,
    QUERIES,
    SERVING,
    SPLIT,
    Repository,
    decode,
    health_of,
    make_repository,
    rows,
)

# ---- a repository served as it is ----------------------------------------------------------


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    return make_repository(tmp_path_factory)


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
