"""Bearer tokens from `--auth-tokens`: who is let in, what a refusal says, what stays open
(health, reflection), reloading on SIGHUP, and the startup checks of the file. Real daemons,
real channels, real grpcurl."""

from __future__ import annotations

import hashlib
import secrets
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from retd.client import Client, UnauthenticatedError
from retd.server.security import SecurityError, TokenStore
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import REPO, RunningServer, start_server
from tests.security.conftest import CALL_TIMEOUT_S, decode_request, embedding, run_to_exit

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


# --- SIGHUP --------------------------------------------------------------------------------


def reload_lines(server: RunningServer, kind: str) -> int:
    marker = {"ok": "tokens reloaded from", "kept": "tokens not reloaded"}[kind]
    return sum(marker in line for line in server.log().splitlines())


def sighup(server: RunningServer, kind: str) -> str:
    """Send SIGHUP and wait (bounded) for the log line of that reload; returns it."""
    before = reload_lines(server, kind)
    server.process.send_signal(signal.SIGHUP)
    poll(lambda: reload_lines(server, kind) > before, what=f"a '{kind}' reload line")
    marker = {"ok": "tokens reloaded from", "kept": "tokens not reloaded"}[kind]
    return [line for line in server.log().splitlines() if marker in line][-1]


@dataclass
class Reloadable:
    server: RunningServer
    token_file: Path
    stub: pb_grpc.DecoderStub

    def install(self) -> Tokens:
        """Fresh tokens, in the file and (after SIGHUP) in the server: each test starts from
        them, whatever the test before it left."""
        tokens = new_tokens()
        if self.token_file.is_dir():
            self.token_file.rmdir()
        write_tokens(self.token_file, tokens)
        sighup(self.server, "ok")
        assert accepted(self.stub, tokens.plain)
        return tokens


@pytest.fixture(scope="module")
def reloadable(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[Reloadable]:
    """A server whose token file the tests rewrite (with reflection off, for one test)."""
    directory = tmp_path_factory.mktemp("reload")
    token_file = write_tokens(directory / "tokens.txt", new_tokens())
    args = ["--checkpoint", str(checkpoint), "--auth-tokens", str(token_file)]
    running = start_server(directory, [*args, "--reflection", "off"])
    with running.channel() as channel:
        yield Reloadable(running, token_file, pb_grpc.DecoderStub(channel))
    assert running.process.poll() is None  # SIGHUP never stopped it
    assert running.stop() == 0, running.log()


def test_sighup_reload_swaps_the_tokens(reloadable: Reloadable) -> None:
    server, stub = reloadable.server, reloadable.stub
    old, new = reloadable.install(), new_tokens()
    assert accepted(stub, old.plain) and accepted(stub, old.hashed)
    assert not accepted(stub, new.plain) and not accepted(stub, new.hashed)
    reloads = reload_lines(server, "ok")
    write_tokens(reloadable.token_file, new)
    server.process.send_signal(signal.SIGHUP)
    poll(lambda: accepted(stub, new.plain), what="the new token accepted")
    assert accepted(stub, new.hashed)
    assert not accepted(stub, old.plain)
    assert not accepted(stub, old.hashed)
    poll(lambda: reload_lines(server, "ok") == reloads + 1, what="the reload's log line")
    assert "2 accepted" in server.log()
    for secret in (*old.secrets, *new.secrets):
        assert secret not in server.log()


def test_sighup_with_a_bad_file_keeps_the_tokens(reloadable: Reloadable) -> None:
    server, stub, token_file = reloadable.server, reloadable.stub, reloadable.token_file
    tokens = reloadable.install()
    bad_files: dict[str, Callable[[], None]] = {
        "missing": lambda: None,
        "a directory": lambda: token_file.mkdir(),
        "empty": lambda: token_file.write_text(""),
        "only comments": lambda: token_file.write_text("# nothing\n\n   \n"),
        "bad sha256": lambda: token_file.write_text(f"fresh-token\nsha256:{'ab' * 31}\n"),
        "not UTF-8": lambda: token_file.write_bytes(b"fresh-token\n\xff\xfe\n"),
    }
    kept, reloaded = reload_lines(server, "kept"), reload_lines(server, "ok")
    for name, make_bad in bad_files.items():
        if token_file.is_dir():
            token_file.rmdir()
        else:
            token_file.unlink(missing_ok=True)
        make_bad()
        line = sighup(server, "kept")
        assert "the previous ones stay" in line, (name, line)
        assert accepted(stub, tokens.plain), name
        assert accepted(stub, tokens.hashed), name
        assert not accepted(stub, "fresh-token"), name
    assert reload_lines(server, "kept") == kept + len(bad_files)
    assert reload_lines(server, "ok") == reloaded
    again = reloadable.install()  # a good file again: reloaded
    assert not accepted(stub, tokens.plain) and accepted(stub, again.hashed)


def test_reflection_off(reloadable: Reloadable) -> None:
    """The reloading server runs with --reflection off: grpcurl cannot list, health and
    tokens work as ever."""
    server = reloadable.server
    listed = grpcurl("-plaintext", server.address, "list")
    assert listed.returncode != 0, listed.stdout
    assert "reflection" in listed.stderr.lower(), listed.stderr
    assert health_status(server) == health_pb2.HealthCheckResponse.SERVING
    tokens = reloadable.install()
    assert accepted(reloadable.stub, tokens.plain)
    assert not accepted(reloadable.stub, "wrong")


def test_sighup_without_auth_tokens_is_harmless(server: RunningServer) -> None:
    """The shared plaintext server has no token file: SIGHUP changes nothing."""
    server.process.send_signal(signal.SIGHUP)
    with server.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        assert stub.Decode(decode_request(), timeout=CALL_TIMEOUT_S).usage.generated_tokens == 4
    assert server.process.poll() is None  # SIGHUP's default action would have ended it
    assert "tokens reloaded" not in server.log() and "tokens not reloaded" not in server.log()


# --- startup checks ------------------------------------------------------------------------


# Other bad files (only comments, non-hex digests) take the same paths: see the unit test
# test_token_store_rejects_bad_files below, which costs no process.
BAD_TOKEN_FILES = {
    "empty": b"",
    "short sha256": b"good-token\nsha256:abc\n",
    "not UTF-8": b"good-token\n\xff\xfe\n",
}


@pytest.fixture(scope="module")
def exits(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict[str, tuple[int, str]]:
    """Every token file that must stop the daemon, run at once: case -> (status, output)."""
    directory = tmp_path_factory.mktemp("token-exits")
    cases = {"missing": ["--auth-tokens", str(directory / "absent.txt")]}
    for index, (name, content) in enumerate(BAD_TOKEN_FILES.items()):
        path = directory / f"tokens-{index}.txt"
        path.write_bytes(content)
        cases[name] = ["--auth-tokens", str(path)]
    return run_to_exit(
        directory, {name: ["--checkpoint", str(checkpoint), *args] for name, args in cases.items()}
    )


@pytest.mark.parametrize("case", ["empty", "short sha256"])
def test_bad_token_file_at_start_exits_naming_auth_tokens(
    exits: dict[str, tuple[int, str]], case: str
) -> None:
    status, output = exits[case]
    assert status != 0, output
    assert "auth_tokens: " in output and "tokens-" in output, output
    assert "sha256" in output if "sha256" in case else "holds no token" in output, output


def test_missing_token_file_at_start_exits_naming_auth_tokens(
    exits: dict[str, tuple[int, str]],
) -> None:
    status, output = exits["missing"]
    assert status != 0, output
    assert "auth_tokens: cannot read " in output and "absent.txt" in output, output


def test_non_utf8_token_file_at_start_exits(exits: dict[str, tuple[int, str]]) -> None:
    status, output = exits["not UTF-8"]
    assert status != 0, output


def test_non_utf8_token_file_at_start_exits_naming_auth_tokens(
    exits: dict[str, tuple[int, str]],
) -> None:
    assert "auth_tokens" in exits["not UTF-8"][1], exits["not UTF-8"][1]


# --- TokenStore.accepts, property-based ----------------------------------------------------

# Characters a token line may hold: no whitespace or line breaks (str.splitlines and strip
# treat many code points as such), no surrogates (not UTF-8 encodable).
TOKEN_CHARS = st.characters(
    blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"),
    blacklist_characters="\x1c\x1d\x1e\x1f\x85",
)
TOKENS = st.text(TOKEN_CHARS, min_size=1, max_size=40).filter(
    lambda t: not t.startswith(("#", "sha256:"))
)


def store_of(plain: list[str], hashed: list[str]) -> TokenStore:
    lines = ["# tokens", *plain, ""]
    lines += [f"sha256:{hashlib.sha256(t.encode()).hexdigest()}" for t in hashed]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "tokens.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return TokenStore(path)


FIXED = store_of(["fixed-plain-token"], ["fixed-hashed-token"])


@given(st.text())
def test_random_authorization_values_are_refused(value: str) -> None:
    assume(value.strip() not in ("fixed-plain-token", "fixed-hashed-token"))
    for candidate in (value, f"Bearer {value}", f"bearer {value}", f"Bearer  {value} "):
        assert not FIXED.accepts(candidate), candidate
    assert FIXED.accepts("Bearer fixed-plain-token")  # the store does accept its own
    assert FIXED.accepts("Bearer fixed-hashed-token")


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=150)
@given(
    st.lists(TOKENS, min_size=1, max_size=5, unique=True),
    st.lists(TOKENS, min_size=0, max_size=5, unique=True),
    st.lists(TOKENS, min_size=1, max_size=10),
)
def test_only_exact_accepted_tokens_pass(
    plain: list[str], hashed: list[str], others: list[str]
) -> None:
    store = store_of(plain, hashed)
    accepted_tokens = set(plain) | set(hashed)
    assert len(store) == len(plain) + len(hashed)
    for token in accepted_tokens:
        assert store.accepts(f"Bearer {token}"), token
        assert not store.accepts(f"Basic {token}")
        assert not store.accepts(token)
        assert not store.accepts(f"Bearer {token}x")
        assert not store.accepts(f"Bearer x{token}")
        if len(token) > 1:
            assert not store.accepts(f"Bearer {token[:-1]}") or token[:-1] in accepted_tokens
    for other in others:
        assert store.accepts(f"Bearer {other}") == (other in accepted_tokens)


def test_token_store_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "tokens.txt"
    for content in ("", "# nothing\n\n  \n", "sha256:12\n", f"ok\nsha256:{'g' * 64}\n"):
        path.write_text(content)
        with pytest.raises(SecurityError, match="auth_tokens"):
            TokenStore(path)
