"""The Prometheus `/metrics` endpoint: its HTTP listener, and what happens when its port is
taken.

A port given by `--metrics-port` (or `RETD_METRICS_PORT`, or `metrics_port` in the TOML
file) must be free: the daemon does not start otherwise, and the error names the setting.
The default port (9464) is only a first choice: when another daemon holds it, the next free
port of the `METRICS_PORT_TRIES` after it serves instead, and a warning says which, so a
second `retd serve --port 6000` on one machine starts by itself.
"""

from __future__ import annotations

import errno
import logging

log = logging.getLogger(__name__)

# The default metrics port and the ports after it that a daemon tries when it is taken.
METRICS_PORT_TRIES = 100

CHANGE_IT = (
    "set another port with --metrics-port (or RETD_METRICS_PORT, or metrics_port in the "
    "--config file), or 0 for no metrics endpoint"
)


class MetricsEndpointError(OSError):
    """The endpoint cannot listen; the message names the setting that changes it."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 98] "
        return str(self.strerror)


def start_metrics_endpoint(host: str, port: int, *, port_given: bool) -> int:
    """Serve Prometheus' default registry on `host:port` in a daemon thread; returns the port
    it listens on. `port_given`: `port` was set explicitly (no other port will do); else it
    is the default, and the next free one of the `METRICS_PORT_TRIES` after it serves when
    it is taken."""
    from prometheus_client import start_http_server

    last = port if port_given else min(port + METRICS_PORT_TRIES, 65535)
    for candidate in range(port, last + 1):
        try:
            start_http_server(candidate, addr=host)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and candidate < last:
                continue
            where = f"{host}:{port}" if candidate == port else f"{host}:{port}..{candidate}"
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE and candidate > port:
                reason = "every port is taken"
            fix = (
                CHANGE_IT if exc.errno == errno.EADDRINUSE else f"check --metrics-host; {CHANGE_IT}"
            )
            raise MetricsEndpointError(
                exc.errno, f"the metrics endpoint cannot listen on {where}: {reason}; {fix}"
            ) from None
        if candidate != port:
            log.warning(
                "metrics port %d is taken (another retd?): /metrics listens on %s:%d instead; "
                "--metrics-port chooses the port",
                port,
                host,
                candidate,
            )
        return candidate
    raise AssertionError("unreachable: the loop returns or raises")
