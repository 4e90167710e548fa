"""TLS, mutual TLS and bearer tokens for the clients' channels."""

from __future__ import annotations

import os
from collections.abc import Sequence

import grpc

PemSource = bytes | str | os.PathLike[str]


def _pem(source: PemSource | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as file:
        return file.read()


def resolve(
    credentials: grpc.ChannelCredentials | None,
    metadata: Sequence[tuple[str, str]] | None,
    *,
    tls: bool,
    root_certificates: PemSource | None,
    certificate_chain: PemSource | None,
    private_key: PemSource | None,
    token: str | None,
) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...] | None]:
    """The channel credentials and per-call metadata the client's arguments ask for."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key: give both (mutual TLS) or neither")
    wants_tls = tls or root_certificates is not None or certificate_chain is not None
    if credentials is None and wants_tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem(root_certificates),
            private_key=_pem(private_key),
            certificate_chain=_pem(certificate_chain),
        )
    pairs = tuple(metadata or ())
    if token is not None:
        if not token or any(c.isspace() for c in token):
            raise ValueError("token: expected a non-empty token without spaces")
        pairs += (("authorization", f"Bearer {token}"),)
    return credentials, pairs or None


# gRPC's words for a connection that failed at its start, and what each most likely means.
_PLAINTEXT_HINT = (
    "the server closed the connection at once: it may require TLS (Client(tls=True, "
    "root_certificates=CA_PEM), or retd --tls --ca-cert CA_PEM)"
)
_NOT_VERIFIED_HINT = (
    "the server's TLS certificate did not verify against the CAs this client trusts: pass "
    "the CA that signed it (root_certificates=CA_PEM, or retd --ca-cert CA_PEM)"
)
_NO_TLS_HINT = (
    "the server does not speak TLS on this port: connect without TLS (no tls=True / "
    "root_certificates, no retd --tls / --ca-cert)"
)
_CLIENT_CERT_HINT = (
    "the server closed the TLS connection at once: it may require a client certificate "
    "(mutual TLS: certificate_chain= and private_key=, or retd --cert and --key)"
)


def connection_hint(details: str, secure: bool | None) -> str:
    """What a failed connection's UNAVAILABLE most likely means, from gRPC's message and
    whether the channel used TLS (None: unknown, a channel of the caller's); "" if nothing.

    >>> connection_hint("ipv4:127.0.0.1:1: Socket closed", secure=False)[:40]
    'the server closed the connection at once'
    """
    if secure is None:
        return ""
    if secure and "CERTIFICATE_VERIFY_FAILED" in details:
        return _NOT_VERIFIED_HINT
    if secure and "WRONG_VERSION_NUMBER" in details:
        return _NO_TLS_HINT
    if "Socket closed" in details:
        return _CLIENT_CERT_HINT if secure else _PLAINTEXT_HINT
    return ""
