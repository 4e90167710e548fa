"""Memory figures: what a finished sequence carries (device memory on CUDA, the process's
resident memory on the CPU) and the resident memory of the daemon's process tree (its
engine processes and span export child), read from /proc."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MemorySample:
    """Memory when a sequence finished: device memory on CUDA (allocated now, and the peak
    since the process started), resident memory of the process on the CPU."""

    device_allocated_bytes: int | None = None
    device_peak_bytes: int | None = None
    rss_bytes: int | None = None


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


#: How old a resident-memory figure a sequence's result may carry: reading /proc takes three
#: system calls, each of which hands the GIL to the event loop's thread and waits to get it
#: back, so a busy worker reads it at most this often.
RSS_MAX_AGE_S = 0.1
_rss_read: tuple[float, int | None] = (-RSS_MAX_AGE_S, None)  # (monotonic time, bytes)


def sample_memory(device: torch.device) -> MemorySample:
    """Cheap: host-side counters only, no device sync; on the CPU the process's resident
    memory as read within the last RSS_MAX_AGE_S."""
    global _rss_read
    if device.type == "cuda":
        import torch

        return MemorySample(
            device_allocated_bytes=torch.cuda.memory_allocated(device),
            device_peak_bytes=torch.cuda.max_memory_allocated(device),
        )
    now = time.monotonic()
    if now - _rss_read[0] >= RSS_MAX_AGE_S:
        _rss_read = (now, rss_bytes())
    return MemorySample(rss_bytes=_rss_read[1])


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident memory of a process, this one by default (None where /proc is not)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except OSError:  # not Linux, or the process is gone
        return None


def child_pids(pid: int | str = "self") -> list[int]:
    """The child processes of a process, this one by default (Linux: each is listed under the
    thread that started it; a thread that ends while they are read is passed over). OSError
    where the process's threads cannot be listed."""
    children: list[int] = []
    for task in list(Path(f"/proc/{pid}/task").iterdir()):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:  # a thread that ended since the listing: the others still count
            continue
    return children


def daemon_rss_bytes() -> int | None:
    """Resident memory of this process and its children (its engine processes)."""
    own = rss_bytes()
    if own is None:
        return None
    try:
        children = child_pids()
    except OSError:
        return own
    return own + sum(rss_bytes(pid) or 0 for pid in children)
