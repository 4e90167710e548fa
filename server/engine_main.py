"""The engine process's side of `--engine process` (the front end's is
server/engine_process.py): load the model the front end names, say ready, take its messages
until it closes us (or goes away), and drain. Started by `EngineProcess` as
`python -c "...engine_main import main..." --read-fd R --write-fd W`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from retd.server import allocator, heap
from retd.server.engine import EngineStats
from retd.server.engine_process import EngineInfo
from retd.server.errors import ServeError
from retd.server.frames import read_frame, write_frame
from retd.server.handles import Event


def serve_engine(read_fd: int, write_fd: int) -> int:
    """The engine process: load the model the front end names, say ready, then take its
    messages until it closes us (or goes away), and drain."""
    import torch

    from retd.server.ret_engine import load_ret_engine

    spec, threads, switch_interval, cpus = read_frame(read_fd)
    torch.set_num_threads(threads)
    sys.setswitchinterval(switch_interval)
    allocator.tune()  # as the daemon's (server/allocator.py)
    sending = threading.Lock()

    def send(message: object) -> None:
        with sending:
            write_frame(write_fd, message)

    try:
        engine = load_ret_engine(spec)
        engine.warm_up()
    except Exception as exc:
        send(("failed", f"{type(exc).__name__}: {exc}"))
        return 1
    heap.settle()  # torch and the model, frozen: collections walk only what comes after

    def sink(events: list[tuple[int, Event]], stats: EngineStats) -> None:
        send(("events", events, stats, engine.device_memory()))

    engine._sink = sink
    engine.worker_cpus = cpus
    engine.start()
    dtype = str(engine.dtype).removeprefix("torch.")
    info = EngineInfo(
        engine.description, engine.scheduler_config, str(engine.device), dtype, os.getpid()
    )
    send(("ready", info))
    while True:
        try:
            message = read_frame(read_fd)
        except (EOFError, OSError):
            return 0  # the front end is gone, and nobody is left to answer: exit now
        if message[0] == "submit":
            _, seq_id, request = message
            try:
                engine.enqueue(seq_id, request)
            except ServeError as error:
                send(("events", [(seq_id, error)], engine.stats(), engine.device_memory()))
        elif message[0] == "cancel":
            engine.cancel(message[1])
        else:
            break
    engine.close_and_join()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="retd's engine process (started by retd serve)")
    parser.add_argument("--read-fd", type=int, required=True)
    parser.add_argument("--write-fd", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text")
    args = parser.parse_args(argv)
    from retd.server.logs import configure_logging

    configure_logging(args.log_level, args.log_format, access=False)
    # The front end drains this process on SIGTERM/SIGINT (a terminal's Ctrl-C reaches the
    # whole process group): the signals themselves are not for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return serve_engine(args.read_fd, args.write_fd)
