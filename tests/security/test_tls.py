"""TLS and mutual TLS on the daemon's port, through real handshakes with certificates made
at test time; the startup checks of the TLS settings; the plaintext warning."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retd.client import Client, UnavailableError
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import RunningServer, start_server
from tests.security.conftest import (
    CALL_TIMEOUT_S,
    Pki,
    decode_request,
    run_to_exit,
    tls_channel,
)

#: Failed handshakes come back quickly; this bounds each refused call.
REFUSED_TIMEOUT_S = 10.0


def tls_args(pki: Pki, checkpoint: Path) -> list[str]:
    return [
        "--checkpoint", str(checkpoint),
        "--tls-cert", str(pki.server.cert_path), "--tls-key", str(pki.server.key_path),
    ]  # fmt: skip


def local(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, checkpoint: Path
) -> Iterator[RunningServer]:
    """TLS on all interfaces (0.0.0.0): it must not warn; the tests still connect over
    loopback, to 127.0.0.1 or localhost."""
    args = [*tls_args(pki, checkpoint), "--host", "0.0.0.0"]
    running = start_server(tmp_path_factory.mktemp("tls"), args)
    yield running
    assert running.stop() == 0, running.log()


@pytest.fixture(scope="module")
def mtls_server(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, checkpoint: Path
) -> Iterator[RunningServer]:
    args = [*tls_args(pki, checkpoint), "--tls-client-ca", str(pki.ca.cert_path)]
    args += ["--access-log", "on"]  # the tests tell served calls from refused ones by it
    running = start_server(tmp_path_factory.mktemp("mtls"), args)
    yield running
    assert running.stop() == 0, running.log()


def decode(channel: grpc.Channel, timeout: float = CALL_TIMEOUT_S) -> pb.DecodeResponse:
    with channel:
        return pb_grpc.DecoderStub(channel).Decode(decode_request(), timeout=timeout)


def refused(channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        decode(channel, timeout=REFUSED_TIMEOUT_S)
    return caught.value


def access_lines(server: RunningServer) -> list[str]:
    return [line for line in server.log().splitlines() if "retd.access" in line]


def decode_lines(server: RunningServer) -> int:
    return sum("Decode " in line for line in access_lines(server))


def assert_no_new_decode(server: RunningServer, pki: Pki, before: int) -> None:
    """Proof by ordering that refused calls never reached the service: a later good call's
    access line is in the log, and no Decode line came before it since `before` was taken."""

    def info_lines() -> int:
        return sum("GetModelInfo" in line for line in access_lines(server))

    infos = info_lines()
    channel = tls_channel(local(server), pki.ca.cert_pem, pki.client)
    with channel:
        pb_grpc.DecoderStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=CALL_TIMEOUT_S)
    poll(lambda: info_lines() > infos, what="the good call's access line")
    assert decode_lines(server) == before, server.log()


# --- TLS -----------------------------------------------------------------------------------


def test_decode_over_tls_trusting_the_ca(tls_server: RunningServer, pki: Pki) -> None:
    response = decode(tls_channel(local(tls_server), pki.ca.cert_pem))
    assert response.usage.generated_tokens == 4
    assert response.model == "ret_v21"


def test_tls_by_host_name_localhost(tls_server: RunningServer, pki: Pki) -> None:
    response = decode(tls_channel(f"localhost:{tls_server.port}", pki.ca.cert_pem))
    assert response.usage.generated_tokens == 4


def test_client_class_over_tls(tls_server: RunningServer, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    with Client(local(tls_server), timeout=CALL_TIMEOUT_S, credentials=credentials) as client:
        assert client.decode(decode_request().embedding.vector.values, max_new_tokens=3).usage
        assert client.health().name == "SERVING"


def test_plaintext_channel_to_the_tls_port_fails(tls_server: RunningServer) -> None:
    error = refused(grpc.insecure_channel(local(tls_server)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error


def test_channel_trusting_another_ca_fails(tls_server: RunningServer, pki: Pki) -> None:
    error = refused(tls_channel(local(tls_server), pki.other_ca.cert_pem))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error


def client_error(target: str, **security: object) -> str:
    """What a retd Client says when its first call cannot connect."""
    client = Client(target, timeout=REFUSED_TIMEOUT_S, **security)  # type: ignore[arg-type]
    with client, pytest.raises(UnavailableError) as caught:
        client.health()
    return str(caught.value)


def test_the_client_says_what_a_tls_mismatch_likely_is(
    tls_server: RunningServer, mtls_server: RunningServer, server: RunningServer, pki: Pki
) -> None:
    """Not just `UNAVAILABLE ... Socket closed`: a hint of the likely cause and its fix."""
    plaintext_to_tls = client_error(local(tls_server))
    assert "(hint: the server closed the connection at once: it may require TLS" in (
        plaintext_to_tls
    )
    assert "retd --tls --ca-cert CA_PEM" in plaintext_to_tls
    untrusted = client_error(local(tls_server), root_certificates=pki.other_ca.cert_pem)
    assert "(hint: the server's TLS certificate did not verify against the CAs" in untrusted
    tls_to_plaintext = client_error(server.address, root_certificates=pki.ca.cert_pem)
    assert "(hint: the server does not speak TLS on this port" in tls_to_plaintext
    no_client_cert = client_error(local(mtls_server), root_certificates=pki.ca.cert_pem)
    assert "it may require a client certificate (mutual TLS" in no_client_cert
    # A channel of the caller's: whether it uses TLS is unknown, so no guess.
    client = Client(channel=grpc.insecure_channel(local(tls_server)), timeout=5)
    with client, pytest.raises(UnavailableError) as caught:
        client.health()
    assert "hint" not in str(caught.value)


def test_the_cli_says_what_a_tls_mismatch_likely_is(tls_server: RunningServer) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "retd.client.cli", "health", "--target", local(tls_server),
         "--timeout", str(REFUSED_TIMEOUT_S)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("error: UNAVAILABLE: ")
    assert "it may require TLS (Client(tls=True, root_certificates=CA_PEM), or retd --tls" in (
        done.stderr
    )


def test_tls_without_client_ca_does_not_ask_for_a_client_cert(
    tls_server: RunningServer, pki: Pki
) -> None:
    """Plain TLS accepts a client that shows no certificate, and one that shows any."""
    assert decode(tls_channel(local(tls_server), pki.ca.cert_pem)).usage.generated_tokens == 4
    foreign = tls_channel(local(tls_server), pki.ca.cert_pem, pki.other_client)
    assert decode(foreign).usage.generated_tokens == 4


# --- mutual TLS ----------------------------------------------------------------------------


def test_mtls_client_cert_signed_by_the_ca_succeeds(mtls_server: RunningServer, pki: Pki) -> None:
    response = decode(tls_channel(local(mtls_server), pki.ca.cert_pem, pki.client))
    assert response.usage.generated_tokens == 4


def test_mtls_health_needs_the_client_cert_too(mtls_server: RunningServer, pki: Pki) -> None:
    """mTLS guards the whole port, health included (unlike bearer tokens)."""
    good = tls_channel(local(mtls_server), pki.ca.cert_pem, pki.client)
    with good:
        answer = health_pb2_grpc.HealthStub(good).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    bad = tls_channel(local(mtls_server), pki.ca.cert_pem)
    with bad, pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(bad).Check(
            health_pb2.HealthCheckRequest(), timeout=REFUSED_TIMEOUT_S
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("who", ["no cert", "cert of an unrelated CA", "plaintext"])
def test_mtls_refuses_at_the_handshake(mtls_server: RunningServer, pki: Pki, who: str) -> None:
    """Refused with UNAVAILABLE before any call reaches the service."""
    before = decode_lines(mtls_server)
    channel = {
        "no cert": lambda: tls_channel(local(mtls_server), pki.ca.cert_pem),
        "cert of an unrelated CA": lambda: tls_channel(
            local(mtls_server), pki.ca.cert_pem, pki.other_client
        ),
        "plaintext": lambda: grpc.insecure_channel(local(mtls_server)),
    }[who]
    for _ in range(2):  # a fresh channel each time: no connection to reuse
        error = refused(channel())
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert_no_new_decode(mtls_server, pki, before)


def test_mtls_good_calls_do_show_in_the_access_log(mtls_server: RunningServer, pki: Pki) -> None:
    """The control of the test above: a served Decode does add an access line."""
    before = decode_lines(mtls_server)
    decode(tls_channel(local(mtls_server), pki.ca.cert_pem, pki.client))
    poll(lambda: decode_lines(mtls_server) > before, what="a new Decode access line")


# --- startup checks ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exits(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, checkpoint: Path
) -> dict[str, tuple[int, str]]:
    """Every TLS configuration that must stop the daemon, run at once: case -> (status,
    output). The tests run as root, so a chmod 000 file would still be readable: an
    unreadable file is a path that does not exist, or a directory. (Each case loads the
    model before it fails, so the list is kept short: the three files share one reader.)"""
    directory = tmp_path_factory.mktemp("tls-exits")
    garbage = directory / "garbage.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    absent = directory / "absent.pem"
    cert, key, ca = pki.server.cert_path, pki.server.key_path, pki.ca.cert_path

    def tls(cert: Path | None, key: Path | None, client_ca: Path | None = None) -> list[str]:
        args = ["--checkpoint", str(checkpoint)]
        for flag, path in (
            ("--tls-cert", cert),
            ("--tls-key", key),
            ("--tls-client-ca", client_ca),
        ):
            args += [flag, str(path)] if path is not None else []
        return args

    return run_to_exit(
        directory,
        {
            "cert without key": tls(cert, None),
            "client CA without cert": tls(None, None, ca),
            "tls_cert unreadable": tls(absent, key, ca),
            "tls_key unreadable": tls(cert, directory, ca),
            "client CA not a certificate": tls(cert, key, garbage),
            "key of another certificate": tls(cert, pki.client.key_path),
            "cert not a certificate": tls(garbage, key),
        },
    )


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("cert without key", "tls_key"),
        ("client CA without cert", "tls_client_ca"),
    ],
)
def test_incomplete_tls_settings_exit_naming_them(
    exits: dict[str, tuple[int, str]], case: str, named: str
) -> None:
    status, output = exits[case]
    assert status != 0, output
    assert named in output, output


@pytest.mark.parametrize("setting", ["tls_cert", "tls_key"])
def test_unreadable_tls_file_exits_naming_the_setting(
    exits: dict[str, tuple[int, str]], setting: str
) -> None:
    status, output = exits[f"{setting} unreadable"]
    assert status != 0, output
    assert f"{setting}: cannot read " in output, output


@pytest.mark.parametrize(
    "case", ["client CA not a certificate", "key of another certificate", "cert not a certificate"]
)
def test_malformed_tls_material_exits(exits: dict[str, tuple[int, str]], case: str) -> None:
    status, output = exits[case]
    assert status != 0, output
    assert "cannot start" in output, output


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("cert not a certificate", "tls_cert"),
        ("key of another certificate", "tls_key"),
        ("client CA not a certificate", "tls_client_ca"),
    ],
)
def test_malformed_tls_material_exits_naming_the_setting(
    exits: dict[str, tuple[int, str]], case: str, named: str
) -> None:
    assert named in exits[case][1], exits[case][1]


# --- the plaintext warning -----------------------------------------------------------------


def test_plaintext_on_loopback_logs_no_warning(server: RunningServer) -> None:
    """The shared plaintext server of tests/conftest.py, on 127.0.0.1."""
    assert decode(server.channel()).usage.generated_tokens == 4
    assert "retd serving" in server.log()
    assert "PLAINTEXT" not in server.log()


@pytest.fixture(scope="module")
def open_server(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path
) -> Iterator[RunningServer]:
    """Plaintext on 0.0.0.0 (the tests still only connect over loopback)."""
    args = ["--checkpoint", str(checkpoint), "--host", "0.0.0.0"]
    running = start_server(tmp_path_factory.mktemp("open"), args)
    yield running
    assert running.stop() == 0, running.log()


def test_plaintext_on_all_interfaces_logs_the_warning(open_server: RunningServer) -> None:
    assert decode(grpc.insecure_channel(local(open_server))).usage.generated_tokens == 4
    warnings = [line for line in open_server.log().splitlines() if "PLAINTEXT" in line]
    assert len(warnings) == 1, open_server.log()
    assert "WARNING" in warnings[0] and "0.0.0.0" in warnings[0]


def test_plaintext_warning_names_the_bound_port(open_server: RunningServer) -> None:
    warning = next(line for line in open_server.log().splitlines() if "PLAINTEXT" in line)
    assert f"0.0.0.0:{open_server.port}" in warning, warning


def test_tls_on_all_interfaces_logs_no_warning(tls_server: RunningServer) -> None:
    assert tls_server.address.startswith("0.0.0.0:")
    assert "retd serving" in tls_server.log()
    assert "PLAINTEXT" not in tls_server.log()
