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
