"""Servers for `retd bench --checkpoint`: `retd serve` subprocesses on free loopback ports,
stopped afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

#: `retd serve` flags that turn Decode's loop breakers and length bias off: plain greedy, as
#: `generate()` decodes by default (the raw model, TorchServe's handler).
PLAIN_GREEDY = "--decode-no-repeat-ngram-size 0 --decode-repetition-penalty 1 --decode-eos-bias 0"


@contextlib.contextmanager
def spawned_server(
    checkpoint: Path, server_args: str, env: Mapping[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """A `retd serve` subprocess on a free loopback port, with this process's environment and
    `env` over it; yields its address and pid."""
    with tempfile.TemporaryDirectory() as folder:
        ready = Path(folder) / "ready.json"
        command = [
            sys.executable, "-m", "retd.server", "--checkpoint", str(checkpoint),
            "--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready),
            "--log-level", "WARNING", *shlex.split(server_args),
        ]  # fmt: skip
        process = subprocess.Popen(command, env=None if env is None else {**os.environ, **env})
        try:
            deadline = time.monotonic() + 120
            while not ready.exists():
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited with {process.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start within 120 s")
                time.sleep(0.05)
            yield json.loads(ready.read_text())["address"], process.pid
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def spawned_servers(
    checkpoint: Path, server_args: str, replicas: int
) -> Iterator[tuple[list[str], list[int]]]:
    """`replicas` servers as `spawned_server` starts them; yields their addresses and pids.
    Each gets a free metrics port, and with more than one unpinned threads (`--worker-cpus
    none`: with `auto` every replica would put its worker on the same last CPUs), unless
    `server_args` names them."""
    with contextlib.ExitStack() as stack:
        started = []
        for _ in range(replicas):
            args = server_args
            if "--metrics-port" not in args:  # never the default port a daemon may hold
                args = f"{args} --metrics-port {free_port()}"
            if replicas > 1 and "--worker-cpus" not in args:
                args = f"{args} --worker-cpus none"
            started.append(stack.enter_context(spawned_server(checkpoint, args)))
        yield [address for address, _ in started], [pid for _, pid in started]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
