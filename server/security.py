"""Who may call: TLS and mutual TLS on the listening port, and bearer tokens.

Tokens come from a file (`--auth-tokens`): one per line, either the token itself or
`sha256:<hex>` of it; blank lines and `#` comments are skipped. Only SHA-256 digests are
kept in memory and a presented token is compared with every one in constant time. The
file is read again on SIGHUP; a file that cannot be read leaves the tokens as they were.
Health and reflection stay open (for probes and grpcurl) unless configured otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import threading
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

UNAUTHENTICATED = "missing or invalid credentials: send metadata 'authorization: Bearer <token>'"
ADMIN_CLOSED = (
    "the admin service is closed on a non-loopback address without tokens: start the "
    "server with --admin-tokens FILE (or --auth-tokens FILE)"
)


class SecurityError(ValueError):
    """A TLS or token file is missing or malformed; the message says which."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"{what}: cannot read {path}: {exc.strerror}") from None


def _pem(path: Path, what: str, marker: bytes) -> bytes:
    """A PEM file's bytes, refused early (naming the setting) when it holds no `marker` block."""
    data = _read(path, what)
    if b"-----BEGIN " + marker not in data:
        kind = marker.decode().lower()
        raise SecurityError(f"{what}: {path} is not a PEM {kind} (no 'BEGIN {marker.decode()}')")
    return data


def unusable_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None, address: str
) -> SecurityError:
    """What to say when `add_secure_port` failed although the PEM blocks were present: the
    key does not belong to the certificate, or a block is corrupt."""
    files = f"tls_cert {cert}, tls_key {key}"
    if client_ca is not None:
        files += f", tls_client_ca {client_ca}"
    return SecurityError(
        f"{files}: cannot be used together (is the key the certificate's? is a file "
        f"corrupt?); TLS could not listen on {address}"
    )


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """TLS credentials for the listening port, or None for plaintext. With `client_ca`,
    clients must present a certificate it signed (refused at the handshake otherwise)."""
    if cert is None and key is None:
        if client_ca is not None:
            raise SecurityError("tls_client_ca: mutual TLS needs tls_cert and tls_key too")
        return None
    if cert is None or key is None:
        raise SecurityError("tls_cert and tls_key: give both (the certificate and its key)")
    pair = (_pem(key, "tls_key", b"PRIVATE KEY"), _pem(cert, "tls_cert", b"CERTIFICATE"))
    root = _pem(client_ca, "tls_client_ca", b"CERTIFICATE") if client_ca is not None else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=root, require_client_auth=bool(root)
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenStore:
    """The accepted tokens' SHA-256 digests, reloadable from their file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._digests: tuple[bytes, ...] = ()
        self.load()

    def __len__(self) -> int:
        return len(self._digests)

    def load(self) -> None:
        """Read the file; raises SecurityError and keeps the current tokens if it is bad."""
        digests = []
        try:
            text = _read(self.path, "auth_tokens").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SecurityError(
                f"auth_tokens: {self.path} is not UTF-8 text (byte {exc.start})"
            ) from None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("sha256:"):
                try:
                    digest = bytes.fromhex(line.removeprefix("sha256:"))
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise SecurityError(
                        f"auth_tokens: {self.path} line {number}: expected sha256:<64 hex digits>"
                    )
                digests.append(digest)
            else:
                digests.append(_digest(line))
        if not digests:
            raise SecurityError(f"auth_tokens: {self.path} holds no token")
        with self._lock:
            self._digests = tuple(digests)

    def reload(self) -> None:
        """For SIGHUP: load, or log why not and keep the tokens as they were."""
        try:
            self.load()
        except SecurityError as exc:
            log.error("tokens not reloaded, the previous ones stay: %s", exc)
        else:
            log.info("tokens reloaded from %s: %d accepted", self.path, len(self))

    def accepts(self, authorization: str) -> bool:
        """Whether `authorization` is `Bearer <token>` for an accepted token (constant time
        in the token: every digest is compared)."""
        scheme, _, token = authorization.partition(" ")
        presented = _digest(token.strip())
        with self._lock:
            digests = self._digests
        matched = False
        for digest in digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched and scheme.lower() == "bearer"


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Turns away calls without an accepted bearer token, except to `open_services`.

    `tokens` guards every other service (None: they are open), `service_tokens` names
    services guarded by tokens of their own, and `closed_services` are refused to everyone
    with PERMISSION_DENIED."""

    def __init__(
        self,
        tokens: TokenStore | None,
        open_services: Collection[str],
        service_tokens: Mapping[str, TokenStore] | None = None,
        closed_services: Collection[str] = (),
    ) -> None:
        self.tokens = tokens
        self.open_services = frozenset(open_services)
        self.service_tokens = dict(service_tokens or {})
        self.closed_services = frozenset(closed_services)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method  # "/package.Service/Method"
        service = method.split("/")[1] if method.count("/") >= 2 else ""
        handler = await continuation(handler_call_details)
        if handler is None or service in self.open_services:
            return handler
        if service in self.closed_services:
            return _refusing(handler, grpc.StatusCode.PERMISSION_DENIED, ADMIN_CLOSED)
        tokens = self.service_tokens.get(service, self.tokens)
        if tokens is None:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if tokens.accepts(str(metadata.get("authorization", ""))):
            return handler
        return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)


def _refusing(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as `handler` that answers `code`."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream, **options)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **options)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, **options)
    return grpc.unary_unary_rpc_method_handler(unary, **options)
