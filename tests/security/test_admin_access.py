"""Who may call the ModelRepository admin service: with --admin-tokens only its tokens (not
the Decoder's), with --auth-tokens alone those, open on loopback without tokens, and closed
to everyone (PERMISSION_DENIED) on a non-loopback address without tokens. Real daemons,
real channels; SIGHUP reloads the admin tokens."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from retd.v1 import repository_pb2 as admin_pb
from retd.v1 import repository_pb2_grpc as admin_grpc
from tests._wait import poll
from tests.conftest import RunningServer, start_server
from tests.security.conftest import CALL_TIMEOUT_S, decode_request
from tests.security.test_tokens import bearer

DECODER_TOKEN, ADMIN_TOKEN = "decoder-token-4b1f", "admin-token-9c2e"


def admin_list(channel: grpc.Channel, token: str | None = None) -> grpc.StatusCode:
    stub = admin_grpc.ModelRepositoryStub(channel)
    try:
        stub.List(
            admin_pb.RepositoryListRequest(),
            timeout=CALL_TIMEOUT_S,
            metadata=bearer(token) if token else None,
        )
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def decode(channel: grpc.Channel, token: str | None = None) -> grpc.StatusCode:
    try:
        pb_grpc.DecoderStub(channel).Decode(
            decode_request(), timeout=CALL_TIMEOUT_S, metadata=bearer(token) if token else None
        )
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def two_token_server(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path
) -> Iterator[tuple[RunningServer, Path]]:
    directory = tmp_path_factory.mktemp("admin_tokens")
    (directory / "decoder.txt").write_text(DECODER_TOKEN + "\n")
    admin_file = directory / "admin.txt"
    admin_file.write_text(ADMIN_TOKEN + "\n")
    args = ["--checkpoint", str(checkpoint), "--auth-tokens", str(directory / "decoder.txt")]
    running = start_server(directory, [*args, "--admin-tokens", str(admin_file)])
    yield running, admin_file
    assert running.stop() == 0, running.log()


def test_admin_tokens_open_the_admin_service_and_only_it(
    two_token_server: tuple[RunningServer, Path],
) -> None:
    server, _ = two_token_server
    with server.channel() as channel:
        assert admin_list(channel, ADMIN_TOKEN) == grpc.StatusCode.OK
        assert admin_list(channel, DECODER_TOKEN) == grpc.StatusCode.UNAUTHENTICATED
        assert admin_list(channel) == grpc.StatusCode.UNAUTHENTICATED
        assert decode(channel, DECODER_TOKEN) == grpc.StatusCode.OK
        assert decode(channel, ADMIN_TOKEN) == grpc.StatusCode.UNAUTHENTICATED


def test_sighup_reloads_the_admin_tokens(two_token_server: tuple[RunningServer, Path]) -> None:
    server, admin_file = two_token_server
    admin_file.write_text("admin-token-rotated\n")
    server.process.send_signal(signal.SIGHUP)
    with server.channel() as channel:
        poll(
            lambda: admin_list(channel, "admin-token-rotated") == grpc.StatusCode.OK,
            what="the rotated admin token accepted",
        )
        assert admin_list(channel, ADMIN_TOKEN) == grpc.StatusCode.UNAUTHENTICATED
        assert decode(channel, DECODER_TOKEN) == grpc.StatusCode.OK
    admin_file.write_text(ADMIN_TOKEN + "\n")
    server.process.send_signal(signal.SIGHUP)
    with server.channel() as channel:
        poll(lambda: admin_list(channel, ADMIN_TOKEN) == grpc.StatusCode.OK, what="restored")


def test_auth_tokens_alone_guard_the_admin_service_too(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "tokens.txt").write_text(DECODER_TOKEN + "\n")
    args = ["--checkpoint", str(checkpoint), "--auth-tokens", str(tmp_path / "tokens.txt")]
    server = start_server(tmp_path, args)
    try:
        with server.channel() as channel:
            assert admin_list(channel, DECODER_TOKEN) == grpc.StatusCode.OK
            assert admin_list(channel) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        assert server.stop() == 0, server.log()


def test_without_tokens_the_admin_service_is_open_on_loopback_only(
    tmp_path: Path, checkpoint: Path
) -> None:
    loopback = start_server(tmp_path, ["--checkpoint", str(checkpoint)])
    # A later --host wins over the 127.0.0.1 start_server passes; we still call via loopback.
    everywhere = start_server(tmp_path, ["--checkpoint", str(checkpoint), "--host", "0.0.0.0"])
    try:
        with loopback.channel() as channel:
            assert admin_list(channel) == grpc.StatusCode.OK
        with grpc.insecure_channel(f"127.0.0.1:{everywhere.port}") as channel:
            assert admin_list(channel) == grpc.StatusCode.PERMISSION_DENIED
            stub = admin_grpc.ModelRepositoryStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.Unload(admin_pb.UnloadModelRequest(model="ret_v21"), timeout=CALL_TIMEOUT_S)
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "--admin-tokens" in raised.value.details()
            assert decode(channel) == grpc.StatusCode.OK  # the model was not unloaded
            info = pb_grpc.DecoderStub(channel).ListModels(pb.ListModelsRequest(), timeout=30)
            assert [m.name for m in info.models] == ["ret_v21"]
        assert "the ModelRepository admin service is closed" in everywhere.log()
    finally:
        assert loopback.stop() == 0, loopback.log()
        assert everywhere.stop() == 0, everywhere.log()
