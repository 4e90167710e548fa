"""Fixtures of the security tests: certificates made at test time with `cryptography` (a CA,
a server certificate and a client certificate it signed, and an unrelated CA with a client
certificate of its own), a way to run the daemon until it exits, and bounded polling."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from retd.v1 import decoder_pb2 as pb
from tests.conftest import REPO

#: Every call made by these tests carries a deadline this long at most.
CALL_TIMEOUT_S = 20.0


def embedding(seed: int = 0) -> pb.Embedding:
    values = np.random.default_rng(seed).standard_normal(768).astype(np.float32)
    return pb.Embedding(vector=pb.FloatVector(values=values.tolist()))


def decode_request(seed: int = 0, max_new_tokens: int = 4) -> pb.DecodeRequest:
    return pb.DecodeRequest(embedding=embedding(seed), max_new_tokens=max_new_tokens)


def run_to_exit(
    tmp_path: Path, cases: Mapping[str, Sequence[str]], timeout: float = 90.0
) -> dict[str, tuple[int, str]]:
    """Run the daemon as tests/conftest.py's `start_server` does, once per case and all at
    once (each must make it exit; they load the model before failing, so in parallel they
    take half the time on two cores); returns each case's (exit status, everything it
    printed)."""
    running = {}
    for name, args in cases.items():
        ready = tmp_path / f"ready-{time.monotonic_ns()}.json"
        command = [
            sys.executable, "-m", "retd.server", "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "0", "--ready-file", str(ready), *args,
        ]  # fmt: skip
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
            cwd=REPO,
        )
        running[name] = (process, ready)
    results = {}
    try:
        for name, (process, ready) in running.items():
            output, _ = process.communicate(timeout=timeout)
            text = output.decode(errors="replace")
            assert not ready.exists(), f"{name}: a server that must not start wrote its ready file"
            results[name] = (process.returncode, text)
    finally:
        for process, _ in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


# --- certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A certificate and its key, as PEM bytes and as files."""

    cert_pem: bytes
    key_pem: bytes
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Pki:
    ca: Identity
    server: Identity  # signed by `ca`; SANs DNS:localhost and IP:127.0.0.1
    client: Identity  # signed by `ca`
    other_ca: Identity  # unrelated to `ca`
    other_client: Identity  # signed by `other_ca`


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key_pem)
    return Identity(cert_pem, key_pem, cert_path, key_path)


def _issue(
    subject: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signing_key = (
        (issuer[0].subject, issuer[1]) if issuer is not None else (_name(subject), key)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    ca = _issue("retd test CA", None, ca=True)
    other_ca = _issue("unrelated test CA", None, ca=True)
    return Pki(
        ca=_write(directory, "ca", *ca),
        server=_write(directory, "server", *_issue("localhost", ca, server=True)),
        client=_write(directory, "client", *_issue("retd test client", ca)),
        other_ca=_write(directory, "other-ca", *other_ca),
        other_client=_write(directory, "other-client", *_issue("stranger", other_ca)),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Fresh certificates for this run, in a temporary directory (never committed)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_channel(
    address: str,
    roots: bytes,
    client: Identity | None = None,
    options: Sequence[tuple[str, object]] = (),
) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None,
    )
    return grpc.secure_channel(address, credentials, options=list(options))
