"""A RET model's engine in a process of its own (`engine = "process"`).

The front end (the gRPC server's event loop) validates requests and keeps the callers'
handles; the engine process runs the scheduler and the worker thread of an ordinary
`RETEngine` (server/engine.py, server/ret_engine.py), so a decode step never waits for the
GIL of the process that serves the network. They talk over two pipes, a frame each way per
message: a 4-byte length, then a pickle.

    front end -> engine   ("submit", seq_id, SequenceRequest) | ("cancel", seq_id) | ("close",)
    engine -> front end   ("ready", EngineInfo) | ("failed", message)
                          | ("events", [(seq_id, TokenDelta | SequenceResult | ServeError)],
                             EngineStats, device bytes)

The worker sends every step's events as one frame. The front end never blocks on a pipe:
it reads when the loop says the pipe is readable and buffers what the pipe cannot take yet.
An engine process that dies is started again: the calls it had get UNAVAILABLE, and calls
that arrive meanwhile wait for the new one. `close()` drains it (every accepted sequence
finishes) and waits for it to exit; an engine process whose front end dies closes itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

from retd.model.decoding import SamplingParams
from retd.model.kinds import RET_KIND
from retd.server.config import ModelSpec, SchedulerConfig
from retd.server.engine import EngineStats, ModelDescription, model_limits
from retd.server.errors import ErrorKind, ServeError
from retd.server.frames import frame, grow_pipe, read_frame, take_frames, write_frame
from retd.server.handles import SequenceHandle, TokenDelta
from retd.server.requests import SequenceRequest
from retd.server.validation import ModelLimits, RETRequests

log = logging.getLogger(__name__)

# The engine process's main (server/engine_main.py). Not `-m`: what it pickles must name
# its modules, not __main__.
_ENTRY = "import sys; from retd.server.engine_main import main; sys.exit(main())"


@dataclass(frozen=True)
class EngineInfo:
    """What the engine process tells the front end once its model is loaded and warm."""

    description: ModelDescription
    scheduler_config: SchedulerConfig
    device: str
    dtype: str  # torch.float32 -> "float32"
    pid: int


class _Child:
    """One running engine process, as the front end sees it: the process and its pipes."""

    def __init__(self, spec: ModelSpec, threads: int, cpus: frozenset[int]) -> None:
        to_child_r, self.to_child = os.pipe()
        self.from_child, from_child_w = os.pipe()
        for fd in (self.to_child, from_child_w):
            grow_pipe(fd)
        root = logging.getLogger()
        log_format = "json" if any(_is_json(h) for h in root.handlers) else "text"
        command = [
            sys.executable, "-c", _ENTRY,
            "--read-fd", str(to_child_r), "--write-fd", str(from_child_w),
            "--log-level", logging.getLevelName(root.level), "--log-format", log_format,
        ]  # fmt: skip
        self.process = subprocess.Popen(command, pass_fds=(to_child_r, from_child_w))
        os.close(to_child_r)  # the child's ends: it alone holds them, so its exit is EOF here
        os.close(from_child_w)
        try:
            # the child keeps the GIL's switch interval this process runs with (`serve`'s;
            # whole microseconds, which the float read back may fall short of), its main
            # thread the CPUs of this process's (inherited), its worker `cpus`
            interval = round(sys.getswitchinterval(), 6)
            write_frame(self.to_child, (spec, threads, interval, cpus))
            reply = read_frame(self.from_child)
        except (EOFError, OSError):
            self.close_pipes()
            code = self.process.wait()
            raise RuntimeError(f"the engine process exited (code {code}) while loading") from None
        if reply[0] == "failed":
            self.close_pipes()
            self.process.wait()
            raise RuntimeError(reply[1])
        self.info: EngineInfo = reply[1]

    def close_pipes(self) -> None:
        for fd in (self.to_child, self.from_child):
            with contextlib.suppress(OSError):
                os.close(fd)


def _is_json(handler: logging.Handler) -> bool:
    from retd.server.logs import JsonFormatter

    return isinstance(handler.formatter, JsonFormatter)


class EngineProcess(RETRequests):
    """The front end's side of a RET engine in its own process: what the servicer, the
    registry and telemetry use of an `Engine`, over the pipes. Built (loading the model in
    the new process) off the event loop; `start()` on it."""

    kind: ClassVar[str] = RET_KIND
    params_type: ClassVar[type[SamplingParams]] = SamplingParams

    def __init__(self, spec: ModelSpec, threads: int, cpus: frozenset[int] = frozenset()) -> None:
        """`threads`: torch's in the engine process; `cpus`: where its worker runs."""
        self.name = spec.name
        self._spec, self._threads, self._cpus = spec, threads, cpus
        self._child: _Child | None = _Child(spec, threads, cpus)
        info = self._child.info
        self.description = info.description
        self.scheduler_config = info.scheduler_config
        self.device = info.device  # names, not torch objects: this process has no torch
        self.dtype = info.dtype
        # Waiting or running in the engine process: past this a call gets EXHAUSTED here.
        self._capacity = self.scheduler_config.max_queue_size + self.scheduler_config.max_batch_size
        self._handles: dict[int, SequenceHandle] = {}
        self._pending: list[tuple[int, SequenceRequest]] = []  # while (re)starting
        self._ids = itertools.count()
        self._stats = EngineStats(0, 0, self.scheduler_config.max_batch_size)
        self._device_bytes: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._closing = False
        self._exited: asyncio.Event | None = None
        self._restarting: asyncio.Task[None] | None = None

    # ---- the Engine interface -----------------------------------------------------------

    def warm_up(self) -> None:
        """Done: the engine process warms its model up before it says it is ready."""

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._exited = asyncio.Event()
        self._attach()

    def stats(self) -> EngineStats:
        return self._stats

    def device_memory(self) -> int | None:
        return self._device_bytes

    def limits(self, max_new_tokens_limit: int = 0) -> ModelLimits:
        return model_limits(self.name, self.description, max_new_tokens_limit)

    def submit(self, request: SequenceRequest) -> SequenceHandle:
        """Hand a sequence to the engine process (or keep it for the next one while it
        restarts); raises ServeError (EXHAUSTED when its queue is full, UNAVAILABLE when
        shutting down)."""
        if self._closing:
            raise ServeError(ErrorKind.UNAVAILABLE, "the server is shutting down")
        if len(self._handles) >= self._capacity:
            limit = self.scheduler_config.max_queue_size
            raise ServeError(
                ErrorKind.EXHAUSTED,
                f"model {self.name!r}: the queue of waiting requests is full (max_queue_size "
                f"{limit}); retry later",
            )
        handle = SequenceHandle(asyncio.get_running_loop(), self.cancel)
        handle.seq_id = next(self._ids)
        self._handles[handle.seq_id] = handle
        if self._child is None:
            self._pending.append((handle.seq_id, request))
        else:
            self._send(("submit", handle.seq_id, request))
        return handle

    def cancel(self, seq_id: int) -> None:
        if seq_id not in self._handles:
            return  # over already
        for i, (pending, _) in enumerate(self._pending):
            if pending == seq_id:
                del self._pending[i]
                stage = "the engine process restarted"
                error = ServeError(ErrorKind.CANCELLED, f"the call was cancelled while {stage}")
                self._handles.pop(seq_id).deliver_in_loop(error)
                return
        if self._child is not None:
            self._send(("cancel", seq_id))

    async def close(self) -> None:
        """Let the engine process finish every sequence it accepted, then wait for it to
        exit."""
        self._closing = True
        self._fail_pending("the server is shutting down")
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._restarting
        child = self._child
        if child is None:
            return
        if self._loop is None:  # never started: nothing in flight
            child.close_pipes()
        else:
            self._send(("close",))
            assert self._exited is not None
            await self._exited.wait()
        await asyncio.to_thread(child.process.wait)

    # ---- the pipes ------------------------------------------------------------------------

    def _attach(self) -> None:
        assert self._loop is not None and self._child is not None
        os.set_blocking(self._child.to_child, False)
        os.set_blocking(self._child.from_child, False)
        self._inbuf.clear()
        self._outbuf.clear()
        self._loop.add_reader(self._child.from_child, self._readable)

    def _send(self, message: object) -> None:
        """Write now what the pipe takes; the rest when it is writable again."""
        assert self._child is not None and self._loop is not None
        data = frame(message)
        if self._outbuf:
            self._outbuf += data
            return
        try:
            written = os.write(self._child.to_child, data)
        except BlockingIOError:
            written = 0
        except OSError:
            return  # the engine process is gone: the reader sees EOF and fails its calls
        if written < len(data):
            self._outbuf += data[written:]
            self._loop.add_writer(self._child.to_child, self._writable)

    def _writable(self) -> None:
        assert self._child is not None and self._loop is not None
        try:
            written = os.write(self._child.to_child, self._outbuf)
        except BlockingIOError:
            return
        except OSError:
            written = len(self._outbuf)  # gone: the reader sees EOF
        del self._outbuf[:written]
        if not self._outbuf:
            self._loop.remove_writer(self._child.to_child)

    def _readable(self) -> None:
        assert self._child is not None
        try:
            data = os.read(self._child.from_child, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        self._inbuf += data
        for message in take_frames(self._inbuf):
            self._receive(message)

    def _receive(self, message: tuple[Any, ...]) -> None:
        if message[0] != "events":
            log.warning("model %s: unexpected message from its engine: %r", self.name, message)
            return
        _, events, self._stats, self._device_bytes = message
        for seq_id, event in events:
            handle = self._handles.get(seq_id)
            if handle is None:
                continue
            if not isinstance(event, TokenDelta):
                del self._handles[seq_id]
            handle.deliver_in_loop(event)

    # ---- death and restart --------------------------------------------------------------

    def _lost(self) -> None:
        """EOF from the engine process: it exited (drained, when closing) or died."""
        child, loop = self._child, self._loop
        assert child is not None and loop is not None and self._exited is not None
        loop.remove_reader(child.from_child)
        if self._outbuf:
            loop.remove_writer(child.to_child)
        child.close_pipes()
        self._child = None
        code = child.process.poll()
        how = "exited" if code is None else f"exited with code {code}"
        if not self._closing:
            log.error("model %s: its engine process %d %s; restarting it", self.name,
                      child.process.pid, how)  # fmt: skip
        handles, self._handles = self._handles, {}
        message = f"model {self.name!r}: its engine process {how} before the answer"
        for handle in handles.values():
            handle.deliver_in_loop(ServeError(ErrorKind.UNAVAILABLE, message))
        self._exited.set()
        if not self._closing:
            self._exited = asyncio.Event()
            self._restarting = loop.create_task(self._restart(child))

    async def _restart(self, dead: _Child) -> None:
        await asyncio.to_thread(dead.process.wait)
        delay = 0.5
        while not self._closing:
            try:
                child = await asyncio.to_thread(_Child, self._spec, self._threads, self._cpus)
            except Exception as exc:
                log.error("model %s: restarting its engine process failed: %s", self.name, exc)
                self._fail_pending(f"model {self.name!r}: its engine process failed to start")
                await asyncio.sleep(delay)  # back off; the calls that come meanwhile wait
                delay = min(2 * delay, 30.0)
                continue
            if self._closing:  # closed while it loaded: it never took a call
                child.close_pipes()
                await asyncio.to_thread(child.process.wait)
                return
            self._child = child
            self._attach()
            pending, self._pending = self._pending, []
            for seq_id, request in pending:
                self._send(("submit", seq_id, request))
            log.info("model %s: engine process %d is serving", self.name, child.process.pid)
            return

    def _fail_pending(self, message: str) -> None:
        pending, self._pending = self._pending, []
        for seq_id, _ in pending:
            handle = self._handles.pop(seq_id, None)
            if handle is not None:
                handle.deliver_in_loop(ServeError(ErrorKind.UNAVAILABLE, message))
