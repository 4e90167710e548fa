"""glibc's malloc tuned at start (server/allocator.py): a freed block the size of a decode
step's buffers stays in the heap for the next step instead of going back to the kernel, the
environment's own thresholds win, and the daemon says at start what was done."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from retd.server import allocator
from tests.conftest import start_server

# In a fresh interpreter: the resident memory a freed block of 16 MiB (a KV cache's size)
# leaves behind, in KiB, after `tune()` or not (argv[1]: "tune" or "plain").
RETAINED = """
import sys
import numpy as np
from retd.server import allocator

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

if sys.argv[1] == "tune":
    print(allocator.tune(), file=sys.stderr)
block = np.ones(1 << 21)  # 16 MiB, every page touched
block[::512] += 1
before = rss_kib()
del block
print(rss_kib() - before + 16384)
"""

GLIBC = platform.libc_ver()[0] == "glibc"


def retained_kib(mode: str, env: dict[str, str] | None = None) -> int:
    environ = {k: v for k, v in os.environ.items() if k not in allocator.ENVIRONMENT}
    done = subprocess.run(
        [sys.executable, "-c", RETAINED, mode],
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip())


def test_a_freed_step_sized_block_stays_in_the_heap_once_tuned() -> None:
    assert GLIBC, "the daemon's images and CI run on glibc (Debian)"
    assert retained_kib("plain") < 512  # glibc's default: mmap'd, unmapped when freed
    assert retained_kib("tune") >= 15360  # tuned: from the heap, kept for the next step


def test_the_environments_thresholds_win(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    assert retained_kib("tune", env) < 512  # tune() left glibc's (the environment's) alone
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1")
    assert "from MALLOC_*_THRESHOLD_ in the environment" in allocator.tune()


def test_the_daemon_says_how_its_allocator_runs(tmp_path: Path, checkpoint: Path) -> None:
    server = start_server(tmp_path, ["--checkpoint", str(checkpoint)])
    try:
        lines = [line for line in server.log().splitlines() if "allocator:" in line]
        expected = "blocks up to 32 MiB reused from the heap" if GLIBC else "its defaults kept"
        assert len(lines) == 1 and expected in lines[0], server.log()
    finally:
        assert server.stop() == 0, server.log()
