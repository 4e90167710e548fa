"""Several replicas behind one channel: gRPC's own ``round_robin`` policy, client-side health
checking and retries of the calls that are safe to retry, all set through a service config.

A target names several replicas when it is

- a list of ``host:port`` addresses, or one string of them separated by commas;
- a ``dns:///name:port`` target (a headless Service's name resolves to every ready pod, and
  gRPC re-resolves it when a connection drops);
- an ``ipv4:a:p,b:p`` or ``ipv6:[a]:p,[b]:p`` target (gRPC's own schemes for several
  addresses).

Any other target (one ``host:port``, ``unix:...``) keeps gRPC's defaults: one connection, no
retries. The rule for retries is in :data:`RETRIED_METHODS`, :data:`ADMIN_RETRIED_METHODS` and
:func:`deterministic`.
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from retd.v1 import decoder_pb2 as pb
from retd.v1 import repository_pb2

__all__ = [
    "ADMIN_RETRIED_METHODS",
    "ADMIN_SERVICE",
    "BACKOFF_MULTIPLIER",
    "HEALTH_SERVICE",
    "INITIAL_BACKOFF_S",
    "MAX_ATTEMPTS",
    "MAX_BACKOFF_S",
    "RETRIED_METHODS",
    "RETRYABLE_CODES",
    "Channel",
    "TargetError",
    "backoffs",
    "deterministic",
    "resolve",
    "retryable",
    "service_config",
]

SERVICE = pb.DESCRIPTOR.services_by_name["Decoder"].full_name

#: Methods gRPC retries by itself: a repeat gives the same answer (Decode and DecodeBatch are
#: greedy, the other two only read). Generate is retried by the client, and only when the
#: request is :func:`deterministic`: the service config cannot tell one request from another.
#: Streams are never retried: a retry would repeat deltas or answers already delivered.
RETRIED_METHODS = ("Decode", "DecodeBatch", "GetModelInfo", "ListModels")
#: The admin service (``retd.v1.ModelRepository``)...
ADMIN_SERVICE = repository_pb2.DESCRIPTOR.services_by_name["ModelRepository"].full_name
#: ...whose List only reads, so gRPC retries it like the methods above. Load and Unload change
#: what a replica serves and wait for it: they are never repeated behind the caller's back
#: (a Load retried after a replica stopped mid-call would load on another replica).
ADMIN_RETRIED_METHODS = ("List",)
#: A replica that is shutting down refuses calls with UNAVAILABLE before it runs them, and a
#: replica that died drops its connections with UNAVAILABLE: both are worth another replica.
#: CANCELLED too: a call that reaches a replica in the instant its listener closes (after the
#: drain) is cancelled by gRPC before any handler sees it, and one still running when the
#: grace period ends is cancelled by the server. Neither was answered, and the methods
#: retried give the same answer anywhere, so another replica may run them again. A call the
#: caller cancels itself is never retried (gRPC ends it at once).
RETRYABLE_CODES = ("UNAVAILABLE", "CANCELLED")
#: gRPC caps maxAttempts at 5; backoff before attempt n is uniform in
#: [0, min(INITIAL * MULTIPLIER ** (n - 1), MAX)], gRPC's formula.
MAX_ATTEMPTS = 5
INITIAL_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0
BACKOFF_MULTIPLIER = 2.0
#: The health service name each replica is watched on (``grpc.health.v1.Health/Watch``): a
#: replica that turns NOT_SERVING, as a draining one does, gets no more calls.
HEALTH_SERVICE = SERVICE

_SCHEMES = ("dns:", "ipv4:", "ipv6:")


class TargetError(ValueError):
    """A target that names no usable replica; the message says what was expected."""


def service_config() -> str:
    """The service config JSON of a balanced channel."""
    retry = {
        "maxAttempts": MAX_ATTEMPTS,
        "initialBackoff": f"{INITIAL_BACKOFF_S}s",
        "maxBackoff": f"{MAX_BACKOFF_S}s",
        "backoffMultiplier": BACKOFF_MULTIPLIER,
        "retryableStatusCodes": list(RETRYABLE_CODES),
    }
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": HEALTH_SERVICE},
            "methodConfig": [
                {
                    "name": [
                        *({"service": SERVICE, "method": m} for m in RETRIED_METHODS),
                        *({"service": ADMIN_SERVICE, "method": m} for m in ADMIN_RETRIED_METHODS),
                    ],
                    "retryPolicy": retry,
                }
            ],
        }
    )


def deterministic(request: pb.GenerateRequest) -> bool:
    """A Generate that gives the same text wherever and however often it runs: it carries a
    seed, or it is greedy (temperature 0). Only those are retried."""
    return request.HasField("seed") or (
        request.HasField("temperature") and request.temperature == 0
    )


def retryable(code: grpc.StatusCode) -> bool:
    return code.name in RETRYABLE_CODES


def backoffs() -> Iterator[float]:
    """Seconds to wait before each retry, by gRPC's formula (jittered, growing, capped)."""
    ceiling = INITIAL_BACKOFF_S
    for _ in range(MAX_ATTEMPTS - 1):
        yield random.uniform(0, ceiling)
        ceiling = min(ceiling * BACKOFF_MULTIPLIER, MAX_BACKOFF_S)


@dataclass(frozen=True)
class Channel:
    """What to open: the gRPC target, its channel options, and whether it balances."""

    target: str
    options: tuple[tuple[str, Any], ...]
    balanced: bool


def resolve(target: str | Sequence[str], options: Sequence[tuple[str, Any]] = ()) -> Channel:
    """The channel for ``target`` (see the module's doc). A balanced channel gets the service
    config above unless ``options`` already carry a ``grpc.service_config`` (then the
    caller's policy applies and :attr:`Channel.balanced` is False: the client adds nothing)."""
    entries = [target.strip()] if isinstance(target, str) else [str(t).strip() for t in target]
    if len(entries) == 1 and not entries[0].startswith(_SCHEMES):
        entries = [e.strip() for e in entries[0].split(",")]
    entries = [e for e in entries if e]
    if not entries:
        raise TargetError(f"target: expected host:port, or several of them; got {target!r}")
    if len(entries) == 1:
        (single,) = entries
        if not single.startswith("dns:") and not (single.startswith(_SCHEMES) and "," in single):
            return Channel(single, tuple(options), False)  # one replica: gRPC's defaults
        grpc_target = single
    else:
        schemed = [e for e in entries if e.startswith(_SCHEMES)]
        if schemed:
            raise TargetError(
                f"target: a list of replicas takes plain host:port addresses, not "
                f"{schemed[0]!r} (give a dns:/// name alone)"
            )
        grpc_target = _address_list(entries)
    if any(name == "grpc.service_config" for name, _ in options):
        return Channel(grpc_target, tuple(options), False)
    ours = (("grpc.service_config", service_config()), ("grpc.enable_retries", 1))
    return Channel(grpc_target, (*options, *ours), True)


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TargetError(f"target: expected host:port, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _address_list(entries: Sequence[str]) -> str:
    """``ipv4:a:p,b:p`` (or ``ipv6:``) for plain addresses; a host name is resolved here, once,
    to all of its addresses (for a set of replicas that changes, use a ``dns:///`` name)."""
    v4: list[list[str]] = []
    v6: list[list[str]] = []
    for entry in entries:
        host, port = _split(entry)
        try:
            hosts = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as err:
                raise TargetError(f"target: cannot resolve {host!r}: {err}") from None
            hosts = [ipaddress.ip_address(str(info[4][0]).partition("%")[0]) for info in infos]
        v4.append([f"{h}:{port}" for h in hosts if h.version == 4])
        v6.append([f"[{h}]:{port}" for h in hosts if h.version == 6])
    if all(v4):
        return "ipv4:" + ",".join(dict.fromkeys(a for group in v4 for a in group))
    if all(v6):
        return "ipv6:" + ",".join(dict.fromkeys(a for group in v6 for a in group))
    raise TargetError(
        f"target: {list(entries)} mix IPv4 and IPv6 replicas; gRPC balances over one family"
    )
