"""Bearer tokens from `--auth-tokens` reloaded on SIGHUP, and the startup checks of the file.
Real daemons, real channels, real grpcurl."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import RunningServer, start_server
from tests.security.conftest import CALL_TIMEOUT_S, decode_request, run_to_exit
from tests.security.test_tokens import (
    Tokens,
    accepted,
    grpcurl,
    health_status,
    new_tokens,
    write_tokens,
)

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
# test_token_store_rejects_bad_files in test_token_store.py, which costs no process.
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
