"""Daemons forked from tests/_zygote.py (torch already imported) instead of started cold.

`popen(module, argv, env, cwd, log_path)` returns a process with the `subprocess.Popen`
methods the tests use (`pid`, `args`, `poll`, `wait`, `send_signal`, `terminate`, `kill`,
`returncode`); its exit comes from the zygote, which is its parent, and `wait` waits on an
event for it. What the import of torch reads from the environment (TORCH_*, OMP_*, ...) is
the zygote's: a daemon whose environment sets it differently forks from another zygote,
started with that environment (one per such environment, each kept for the worker's life).
With RETD_TEST_FORK=0 daemons start cold, by `subprocess.Popen`, as before."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

#: Environment variables read when torch (and what it loads) is imported: the zygotes differ
#: in these, and only in these.
IMPORT_TIME_ENV = ("TORCH", "PYTORCH", "OMP_", "MKL", "KMP_", "GOMP", "CUDA", "LD_", "PYTHON")
REPO = Path(__file__).resolve().parent.parent


class Zygote:
    """The per-worker `python -m tests._zygote` and the thread that reads its replies."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests._zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        assert self.process.stdout is not None and self.process.stdin is not None
        self.replies = self.process.stdout
        self.requests = self.process.stdin
        first = self.replies.readline()
        if first != b"ready\n":
            raise RuntimeError(f"the zygote did not start: {first!r}")
        self.lock = threading.Lock()  # one request (and its `started` reply) at a time
        self.started = threading.Condition()
        self.started_pids: list[int] = []
        self.codes: dict[int, int] = {}
        self.ended: dict[int, threading.Event] = {}
        threading.Thread(target=self.read, name="zygote replies", daemon=True).start()

    def read(self) -> None:
        for line in self.replies:
            kind, pid, *code = line.decode().split()
            with self.started:
                if kind == "started":
                    self.started_pids.append(int(pid))
                    self.started.notify_all()
                else:
                    self.codes[int(pid)] = int(code[0])
                    self.event(int(pid)).set()
        with self.started:  # the zygote died: nothing it started can be waited on any more
            self.started.notify_all()

    def event(self, pid: int) -> threading.Event:
        return self.ended.setdefault(pid, threading.Event())

    def fork(self, request: dict[str, object]) -> int:
        with self.lock:
            self.requests.write(json.dumps(request).encode() + b"\n")
            self.requests.flush()
            with self.started:
                self.started.wait_for(
                    lambda: self.started_pids or self.process.poll() is not None, timeout=60
                )
                if not self.started_pids:
                    raise RuntimeError(f"the zygote did not fork (exit {self.process.poll()})")
                return self.started_pids.pop(0)


class ForkedProcess:
    """A daemon forked by the zygote, seen as `subprocess.Popen` sees its children."""

    def __init__(self, zygote: Zygote, args: list[str], pid: int) -> None:
        self.zygote = zygote
        self.args = args
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.zygote.event(self.pid).is_set():
            self.returncode = self.zygote.codes[self.pid]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.zygote.event(self.pid).wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        code = self.poll()
        assert code is not None
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # as Popen: never signal a pid that may have been reused
            # and, as Popen, a process that exits between the poll and the kill is no error
            # (its zygote reaps it and reports it a moment later)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


_zygotes: dict[tuple[tuple[str, str], ...], Zygote] = {}
_zygotes_lock = threading.Lock()


def zygote(env: dict[str, str]) -> Zygote:
    """The zygote for `env`: one whose import of torch read what `env` sets."""
    key = tuple(sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME_ENV)))
    with _zygotes_lock:
        found = _zygotes.get(key)
        if found is None or found.process.poll() is not None:
            found = _zygotes[key] = Zygote(env)
        return found


def popen(
    module: str,
    argv: Sequence[str],
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    *,
    cold: bool = False,
) -> subprocess.Popen[bytes] | ForkedProcess:
    """Start `python -m module *argv` with `env` in `cwd`, its output in `log_path`; `cold`:
    by `subprocess.Popen`, for a process that must not hold what the zygote imported."""
    command = [sys.executable, "-m", module, *map(str, argv)]
    if cold or os.environ.get("RETD_TEST_FORK", "1") == "0":
        with log_path.open("ab") as log_file:
            return subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd
            )
    request = {
        "module": module,
        "argv": command[3:],
        "env": env,
        "cwd": str(cwd),
        "log": str(log_path),
    }
    forked = zygote(env)
    return ForkedProcess(forked, command, forked.fork(request))
