"""Messages over a pipe between retd's processes (the engine process, the span exporter's):
a 4-byte big-endian length, then a pickle."""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
from typing import Any

HEADER = struct.Struct("!I")
_PIPE_BYTES = 1 << 20  # ask for 1 MiB pipes (Linux): ~300 queued requests without a wait
_F_SETPIPE_SZ = 1031


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def _read_exactly(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError("the pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Any:
    """Blocking: the next message on `fd` (EOFError once the writer is gone)."""
    (size,) = HEADER.unpack(_read_exactly(fd, HEADER.size))
    return pickle.loads(_read_exactly(fd, size))


def take_frames(buffer: bytearray) -> list[Any]:
    """Non-blocking: the whole messages at the front of `buffer` (bytes read so far), removed
    from it; a message not yet whole stays for the next read."""
    messages, start = [], 0
    while len(buffer) - start >= HEADER.size:
        (size,) = HEADER.unpack_from(buffer, start)
        end = start + HEADER.size + size
        if len(buffer) < end:
            break
        messages.append(pickle.loads(buffer[start + HEADER.size : end]))
        start = end
    del buffer[:start]
    return messages


def write_frame(fd: int, message: object) -> None:
    """Blocking: the whole message."""
    view = memoryview(frame(message))
    while view:
        view = view[os.write(fd, view) :]


def grow_pipe(fd: int) -> None:
    with contextlib.suppress(OSError, ImportError):
        import fcntl

        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
