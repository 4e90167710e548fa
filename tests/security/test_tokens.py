"""Bearer tokens from `--auth-tokens`: who is let in, what a refusal says, what stays open
(health, reflection). Real daemons, real channels, real grpcurl. (Reloading on SIGHUP and
the startup checks of the file: test_token_reload.py; `TokenStore` alone:
test_token_store.py.)"""

from __future__ import annotations

import hashlib
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retd.client import Client, UnauthenticatedError
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import REPO, RunningServer, start_server
from tests.security.conftest import CALL_TIMEOUT_S, decode_request, embedding

GRPCURL = REPO / ".venv" / "bin" / "grpcurl"


@dataclass(frozen=True)
class Tokens:
    plain: str  # written to the file as is
    hashed: str  # only its sha256 is in the file

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.hashed.encode()).hexdigest()

    @property
    def secrets(self) -> list[str]:
        """Everything a refusal must not give away."""
        return [
            self.plain,
            self.hashed,
            self.digest,
            hashlib.sha256(self.plain.encode()).hexdigest(),
        ]


def new_tokens() -> Tokens:
    return Tokens(plain=f"plain-{secrets.token_hex(16)}", hashed=f"hashed-{secrets.token_hex(16)}")


def write_tokens(path: Path, tokens: Tokens) -> Path:
    path.write_text(
        f"# accepted tokens of the test daemon\n{tokens.plain}\n\n"
        f"   sha256:{tokens.digest}   \n# the end\n"
    )
    return path


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def tokens() -> Tokens:
    return new_tokens()


@pytest.fixture(scope="module")
def auth_server(
    tmp_path_factory: pytest.TempPathFactory, tokens: Tokens, checkpoint: Path
) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("tokens")
    token_file = write_tokens(directory / "tokens.txt", tokens)
    args = ["--checkpoint", str(checkpoint), "--auth-tokens", str(token_file)]
    running = start_server(directory, [*args, "--access-log", "on"])
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture
def stub(auth_server: RunningServer) -> Iterator[pb_grpc.DecoderStub]:
    with auth_server.channel() as channel:
        yield pb_grpc.DecoderStub(channel)


def stream_items(n: int) -> Iterator[pb.DecodeStreamRequest]:
    for i in range(n):
        yield pb.DecodeStreamRequest(id=str(i), embedding=embedding(i), max_new_tokens=3)


def generate_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(embedding=embedding(), max_new_tokens=3, seed=7)


#: Each Decoder method called with `metadata`, reading every answer.
CALLS: dict[str, Callable[[pb_grpc.DecoderStub, list[tuple[str, str]]], object]] = {
    "Decode": lambda s, md: s.Decode(decode_request(), timeout=CALL_TIMEOUT_S, metadata=md),
    "Generate": lambda s, md: s.Generate(generate_request(), timeout=CALL_TIMEOUT_S, metadata=md),
    "GenerateStream": lambda s, md: list(
        s.GenerateStream(generate_request(), timeout=CALL_TIMEOUT_S, metadata=md)
    ),
    "DecodeBatch": lambda s, md: s.DecodeBatch(
        pb.DecodeBatchRequest(embeddings=[embedding(1), embedding(2)], max_new_tokens=3),
        timeout=CALL_TIMEOUT_S,
        metadata=md,
    ),
    "DecodeStream": lambda s, md: list(
        s.DecodeStream(stream_items(2), timeout=CALL_TIMEOUT_S, metadata=md)
    ),
    "ListModels": lambda s, md: s.ListModels(
        pb.ListModelsRequest(), timeout=CALL_TIMEOUT_S, metadata=md
    ),
    "GetModelInfo": lambda s, md: s.GetModelInfo(
        pb.GetModelInfoRequest(), timeout=CALL_TIMEOUT_S, metadata=md
    ),
}


def unauthenticated(call: Callable[[], object], tokens: Tokens) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    said = " ".join(
        [
            error.details() or "",
            error.debug_error_string(),
            repr(error.trailing_metadata()),
            repr(error.initial_metadata()),
        ]
    )
    assert "authorization: Bearer <token>" in said  # it says how to authenticate
    for secret in tokens.secrets:
        assert secret not in said
    return error


def accepted(stub: pb_grpc.DecoderStub, token: str) -> bool:
    try:
        stub.Decode(decode_request(), timeout=CALL_TIMEOUT_S, metadata=bearer(token))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
        return False
    return True


# --- who is let in -------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(CALLS))
def test_plain_and_hashed_tokens_are_accepted(
    stub: pb_grpc.DecoderStub, tokens: Tokens, method: str
) -> None:
    for token in (tokens.plain, tokens.hashed):
        assert CALLS[method](stub, bearer(token))


def test_answers_are_real(stub: pb_grpc.DecoderStub, tokens: Tokens) -> None:
    response = stub.Decode(decode_request(), timeout=CALL_TIMEOUT_S, metadata=bearer(tokens.plain))
    assert response.usage.generated_tokens == 4
    answers = list(
        stub.DecodeStream(stream_items(3), timeout=CALL_TIMEOUT_S, metadata=bearer(tokens.hashed))
    )
    assert sorted(a.id for a in answers) == ["0", "1", "2"]
    assert all(a.WhichOneof("outcome") == "response" for a in answers)


def test_scheme_is_case_insensitive(stub: pb_grpc.DecoderStub, tokens: Tokens) -> None:
    md = [("authorization", f"bearer {tokens.plain}")]
    assert stub.Decode(decode_request(), timeout=CALL_TIMEOUT_S, metadata=md).usage


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param(lambda t: [], id="no header"),
        pytest.param(lambda t: bearer("not-" + t.plain), id="wrong token"),
        pytest.param(lambda t: bearer(t.plain[:-1]), id="token prefix"),
        pytest.param(lambda t: bearer(t.plain + "x"), id="token plus a byte"),
        pytest.param(lambda t: bearer(t.digest), id="the digest itself"),
        pytest.param(lambda t: bearer(f"sha256:{t.digest}"), id="the file's sha256 line"),
        pytest.param(lambda t: bearer(""), id="empty bearer"),
        pytest.param(lambda t: [("authorization", t.plain)], id="no scheme"),
        pytest.param(lambda t: [("authorization", f"Basic {t.plain}")], id="basic scheme"),
        pytest.param(lambda t: [("authorization", f"Token {t.hashed}")], id="token scheme"),
        pytest.param(lambda t: [("x-api-key", t.plain)], id="other header"),
    ],
)
@pytest.mark.parametrize("method", ["Decode", "GenerateStream", "DecodeStream", "DecodeBatch"])
def test_refused_unauthenticated_without_leaking_tokens(
    stub: pb_grpc.DecoderStub, tokens: Tokens, metadata, method: str
) -> None:
    unauthenticated(lambda: CALLS[method](stub, metadata(tokens)), tokens)


@pytest.mark.parametrize("method", sorted(CALLS))
def test_every_decoder_method_is_guarded(
    stub: pb_grpc.DecoderStub, tokens: Tokens, method: str
) -> None:
    unauthenticated(lambda: CALLS[method](stub, []), tokens)


def test_refused_calls_never_reach_the_service(
    auth_server: RunningServer, stub: pb_grpc.DecoderStub, tokens: Tokens
) -> None:
    """No model work for a refused call: the model's counters and the access log stay put,
    proved by ordering against a good call that follows."""

    def lines(name: str) -> int:
        return sum(f"retd.access: {name} " in line for line in auth_server.log().splitlines())

    before_decode, before_info = lines("Decode"), lines("GetModelInfo")
    for _ in range(3):
        unauthenticated(lambda: CALLS["Decode"](stub, bearer("wrong")), tokens)
    CALLS["GetModelInfo"](stub, bearer(tokens.plain))
    poll(lambda: lines("GetModelInfo") > before_info, what="the good call's access line")
    assert lines("Decode") == before_decode, auth_server.log()


def test_client_class_with_bearer_metadata(auth_server: RunningServer, tokens: Tokens) -> None:
    vector = np.random.default_rng(3).standard_normal(768).astype(np.float32)
    with Client(
        auth_server.address, timeout=CALL_TIMEOUT_S, metadata=bearer(tokens.hashed)
    ) as client:
        assert client.decode(vector, max_new_tokens=3).usage.generated_tokens == 3
        assert client.generate(vector, max_new_tokens=3, seed=1).usage.generated_tokens == 3
        assert len(list(client.generate_stream(vector, max_new_tokens=3, seed=1))) >= 1
        items = list(client.decode_stream([("a", vector), ("b", vector)], max_new_tokens=2))
        assert sorted(item.id for item in items) == ["a", "b"]
        assert client.model_info().name == "ret_v21"
    with Client(auth_server.address, timeout=CALL_TIMEOUT_S) as anonymous:
        with pytest.raises(UnauthenticatedError):
            anonymous.decode(vector, max_new_tokens=3)
        assert anonymous.health() == "SERVING"  # health stays open


# --- what stays open -----------------------------------------------------------------------


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRPCURL), "-max-time", "20", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def health_status(server: RunningServer, service: str = "") -> int:
    with server.channel() as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
            .status
        )


def test_health_is_open_without_a_token(auth_server: RunningServer) -> None:
    for service in ("", "retd.v1.Decoder", "ret_v21"):
        assert health_status(auth_server, service) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_is_open_without_a_token(auth_server: RunningServer, tokens: Tokens) -> None:
    listed = grpcurl("-plaintext", auth_server.address, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert "retd.v1.Decoder" in services and "grpc.health.v1.Health" in services
    described = grpcurl("-plaintext", auth_server.address, "describe", "retd.v1.Decoder")
    assert described.returncode == 0 and "rpc DecodeStream" in described.stdout


def test_grpcurl_call_needs_the_token(auth_server: RunningServer, tokens: Tokens) -> None:
    """Through reflection, grpcurl can call the Decoder, with the header and only with it."""
    method = [auth_server.address, "retd.v1.Decoder/ListModels"]
    refused = grpcurl("-plaintext", *method)
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr, refused.stderr
    for secret in tokens.secrets:
        assert secret not in refused.stdout + refused.stderr
    allowed = grpcurl("-plaintext", "-H", f"authorization: Bearer {tokens.plain}", *method)
    assert allowed.returncode == 0, allowed.stderr
    assert '"ret_v21"' in allowed.stdout
