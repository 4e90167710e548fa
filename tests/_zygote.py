"""A parent that has imported torch once, for the tests' daemons to start from.

`import torch` is ~3.5 s of CPU on the test machine, most of a daemon's start, and the suite
starts daemons well over a hundred times. This process (`python -m tests._zygote`, one per
pytest worker, started by tests/_forked.py) imports torch and numpy, says `ready`, then reads
one JSON request per line on stdin and forks a child for each: the child points its stdin at
/dev/null and its stdout and stderr at the request's log, takes the request's working
directory and environment, and runs the request's module as `python -m MODULE ARGV...` would
(`runpy`, as `__main__`), ending as an interpreter ends (non-daemon threads joined, atexit
handlers run, streams flushed). The real server code runs, from its own `main`; only the
interpreter's start is shared.

Replies, one line each on stdout: `started PID` for each request, in order, and `exited PID
CODE` when a child ends (CODE as `subprocess` gives it: the exit status, or minus the signal
that ended it). At end of input the children left are killed and reaped."""

from __future__ import annotations

import atexit
import json
import os
import random
import runpy
import select
import signal
import sys
import threading
import traceback
from typing import Any

import numpy as np
import torch  # noqa: F401  (the import every child shares)


def run_child(request: dict[str, Any]) -> int:
    """In the forked child: become `python -m request["module"] *request["argv"]`."""
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    for target, fd in ((0, null), (1, log), (2, log)):
        os.dup2(fd, target)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]  # what `python -m` puts first
    random.seed()  # a fresh process draws its own state; forked ones would share the parent's
    np.random.seed()
    sys.argv = [request["module"], *request["argv"]]
    code: int = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # as the interpreter's own exit does
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return code


def main() -> None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select below
    out = sys.stdout.buffer
    children: set[int] = set()

    def reply(line: str) -> None:
        out.write(line.encode() + b"\n")
        out.flush()

    def reap() -> None:
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            children.discard(pid)
            reply(f"exited {pid} {os.waitstatus_to_exitcode(status)}")

    reply("ready")
    pending = b""
    while True:
        try:
            readable, _, _ = select.select([0, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in readable:
            os.read(wake_r, 4096)
            reap()
        if 0 not in readable:
            continue
        data = os.read(0, 1 << 16)
        if not data:
            break
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    os.close(wake_r)
                    os.close(wake_w)
                    code = run_child(request)
                finally:
                    os._exit(code)
            children.add(pid)
            reply(f"started {pid}")
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for pid in children:  # the test process has gone: take what it left with it
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
