"""glibc's malloc kept from handing a decode step's buffers back to the kernel.

A decode step makes (rows, vocabulary) float32 tensors and frees them within the step: the
logits, their log-probabilities, and for sampled rows the draw's (scaled logits, softmax,
cumulative sum; a filtered row's sorted values and masks), ~0.5 MB each at 64 rows of the
1,792-token checkpoint. Left to its defaults, glibc serves a block that large with mmap (until
its threshold adapts to it) and hands the free top of a thread's heap back to the kernel once
it passes the trim threshold (128 KiB at first), so step after step the worker faulted the
same buffers' pages in again: with 64 sampled callers `perf` put ~10% of the worker's time in
page faults and unmapping, and a server's sampled Generate ran at 0.60-0.75 of greedy Decode
in some runs and ~0.9 in others. `tune()` sets both thresholds (blocks of up to `MMAP_THRESHOLD`
come from the heap; up to `TRIM_THRESHOLD` of a heap's free top is kept): the buffers are
reused, for ~3 MB more resident memory (BENCHMARKS.md). Setting either fixes both (glibc no
longer adapts them), so the mmap threshold is glibc's own ceiling for it: at 4 MiB a
`generate()` call's KV cache (two 25 MB tensors at 64 rows) was mmap'd and faulted in at every
call, and `retd bench --raw` made 0.70x its tokens/s.

The daemon, an engine process and `retd bench --raw` call it at start. glibc's own
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, where set, win; elsewhere than glibc (musl,
macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: Blocks up to this size come from a heap, not mmap (glibc: 128 KiB, adapting upwards to
#: at most this, HEAP_MAX_SIZE / 2 on 64-bit, the most mallopt takes).
MMAP_THRESHOLD = 32 << 20
#: A heap's free top up to this size is kept, not handed back (glibc: 128 KiB, adapting).
TRIM_THRESHOLD = 64 << 20
# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune() -> str:
    """Set glibc's mmap and trim thresholds for this process (see the module's doc); what was
    done, for the log."""
    if platform.libc_ver()[0] != "glibc":
        return "allocator: not glibc, its defaults kept"
    if any(os.environ.get(name) for name in ENVIRONMENT):
        return "allocator: glibc, thresholds from MALLOC_*_THRESHOLD_ in the environment"
    libc = ctypes.CDLL(None)
    done = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    if not done:
        return "allocator: glibc refused the thresholds, its defaults kept"
    return (
        f"allocator: glibc, blocks up to {MMAP_THRESHOLD >> 20} MiB reused from the heap, "
        f"up to {TRIM_THRESHOLD >> 20} MiB of a heap's free top kept"
    )
