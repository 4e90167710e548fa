"""Shared fixtures: a real retd server process on an ephemeral loopback port."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from retd.server.bench.spawn import PLAIN_GREEDY
from retd.server.config.parsers import parse_cpus
from retd.server.memory import child_pids
from tests._forked import ForkedProcess, popen
from tests._wait import poll

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `slow` (each 20-45 s on 2 cores) run first: on `make test`'s two workers
    they start while many short tests are left to even out the end, instead of one of them
    running last while the other worker has nothing to do."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes] | ForkedProcess
    address: str
    port: int
    log_path: Path
    metrics_port: int = 0  # where /metrics listens; 0: nowhere

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def children(self) -> list[int]:
        """The daemon's child processes (its engine processes, with `--engine process`)."""
        return child_pids(self.process.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def thread_affinities(pid: int) -> list[frozenset[int]]:
    """The CPUs each thread of process `pid` may run on (`Cpus_allowed_list`)."""
    masks = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as status:
            line = next(row for row in status if row.startswith("Cpus_allowed_list:"))
        masks.append(parse_cpus(line.split(":")[1].strip()))
    return masks


# Decode with its loop breakers off: what the tests that compare a daemon's Decode with plain
# greedy `generate()` expect. Tests of the default loop breakers pass plain_decode=False.
PLAIN_DECODE = PLAIN_GREEDY.split()


def start_server(
    tmp_path: Path,
    args: Sequence[str],
    env: dict[str, str] | None = None,
    *,
    plain_decode: bool = True,
    default_metrics_port: bool = False,
    module: str = "retd.server",
) -> RunningServer:
    """Start `python -m retd.server` (or another `module` that serves as it does) with `args`
    on 127.0.0.1:0 (forked from the worker's zygote, torch already imported: tests/_forked.py;
    started cold with `--engine process`, whose front end must not hold torch) and wait until
    it says it is serving (it writes its ready file only after every model is loaded and warm).
    plain_decode: Decode's default loop breakers off (PLAIN_DECODE), unless `args` set them.
    default_metrics_port: /metrics on the daemon's default port (else none, unless `args`
    set --metrics-port)."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}.json"
    log_path = ready.with_suffix(".log")
    # No Prometheus endpoint unless asked: test servers run side by side.
    metrics_set = default_metrics_port or "--metrics-port" in args
    defaults = [] if metrics_set else ["--metrics-port", "0"]
    if plain_decode and not any(str(a).startswith("--decode-") for a in args):
        defaults += PLAIN_DECODE
    argv = ["--host", "127.0.0.1", "--port", "0", "--ready-file", str(ready), *defaults, *args]
    log_path.touch()
    # An engine process's front end must not hold torch (tests check its memory): cold.
    engine = [b for a, b in itertools.pairwise(args) if a == "--engine"]
    cold = "process" in engine or "--engine=process" in args
    process = popen(module, argv, {**os.environ, **(env or {})}, REPO, log_path, cold=cold)

    def started() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        return ready.exists()

    try:  # polling for a file the server writes, not waiting on a race
        poll(started, START_TIMEOUT_S, "the ready file", interval=0.05)
    except AssertionError:
        process.kill()
        raise RuntimeError(f"server did not start in time:\n{log_path.read_text()}") from None
    info = json.loads(ready.read_text())
    return RunningServer(process, info["address"], info["port"], log_path, info["metrics_port"])


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, untrained ret_v21 checkpoint in RET v2.1's first shape (one wide block, as
    the first trained checkpoints; the card records it): with random weights it answers each
    embedding differently, which the serving tests need to tell answers apart (random weights
    of the three thin blocks decode most embeddings to the same bytes), and it is faster."""
    from retd.model.checkpoint import init_checkpoint
    from retd.model.model import config_for

    directory = tmp_path_factory.mktemp("checkpoints") / "ret_v21"
    wide = config_for("ret_v21_wide").to_dict()
    return init_checkpoint(directory, seed=1234, shape=wide)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[RunningServer]:
    """One daemon shared by the tests that only call it."""
    running = start_server(tmp_path_factory.mktemp("server"), ["--checkpoint", str(checkpoint)])
    yield running
    assert running.stop() == 0, running.log()
