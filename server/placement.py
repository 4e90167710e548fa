"""Which CPUs the daemon's threads run on (`--worker-cpus`): each model's decode worker (and
its torch threads) on CPUs of their own, everything else (the event loop, gRPC's threads,
the span processor's thread, the span export child, engine processes' main threads) on the
rest.

A thread engine's worker is the daemon's bottleneck at load (on a CPU ~96% of the time);
unpinned, the event loop, the export child and the load's other processes take its core
from it now and then, and tracing's work (more of theirs) then costs it throughput. With the
worker on a CPU of its own nothing of the daemon's preempts it (BENCHMARKS.md, 64 callers on
2 cores, side by side: tracing on 1.02-1.03x the requests/s unpinned, tracing off unchanged).

Linux's affinity is per thread: `pin_process` sets every thread of this process now (the
ones started later inherit their creator's), `pin_thread` the calling one. Elsewhere (no
`os.sched_setaffinity`) nothing is pinned."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

from retd.server.config import ConfigError
from retd.server.config.parsers import AUTO, NONE, cpu_list, parse_cpus

log = logging.getLogger("retd.server")


@dataclass(frozen=True)
class Placement:
    """Where the decode workers run (`workers`) and everything else (`rest`); both empty:
    nowhere in particular (the kernel's choice, unpinned: `why`)."""

    workers: frozenset[int] = frozenset()
    rest: frozenset[int] = frozenset()
    why: str = "worker_cpus none"

    def describe(self) -> str:
        if not self.workers:
            return f"threads not pinned ({self.why})"
        return (
            f"decode workers on CPU {cpu_list(self.workers)}, "
            f"the rest of the daemon on CPU {cpu_list(self.rest)}"
        )


def plan(
    setting: str,
    allowed: Set[int],
    threads: int,
    quota: float | None = None,
    models: int | None = 1,
) -> Placement:
    """The placement `setting` asks for, on the CPUs this process may use (`allowed`) with
    `threads` torch threads a worker, under a cgroup CPU `quota` (CPUs' worth; None: none),
    for `models` models (None: as many as a model repository brings).

    auto: the last `threads` CPUs for the workers, the others for the rest; unpinned unless
    the daemon serves one model (several would share the workers' CPUs), where that would
    leave the rest no CPU, and where the quota is less than the CPUs (the process shares
    them with others, as a container does without CPUs of its own: every such daemon would
    pin its worker to the same last CPUs). none: unpinned. A CPU list: those, for every
    worker, which must be CPUs this process may use and leave it at least one."""
    if setting == NONE:
        return Placement()
    if setting == AUTO:
        ordered = sorted(allowed)
        if models != 1:
            served = "a model repository" if models is None else f"{models} models"
            return Placement(why=f"worker_cpus auto: {served}, not one")
        if len(ordered) <= threads:
            return Placement(why=f"worker_cpus auto: {len(ordered)} CPU for {threads} threads")
        if quota is not None and quota < len(ordered):
            return Placement(
                why=f"worker_cpus auto: a CPU quota of {quota:g} on {len(ordered)} shared CPUs"
            )
        workers = frozenset(ordered[len(ordered) - threads :])
    else:
        workers = parse_cpus(setting)
        outside = workers - allowed
        if outside:
            raise ConfigError(
                f"worker_cpus: CPU {cpu_list(outside)} is not one this process may run on "
                f"({cpu_list(allowed)})"
            )
        if workers >= allowed:
            raise ConfigError(
                f"worker_cpus: {setting} leaves no CPU of {cpu_list(allowed)} to the event "
                f"loop and the rest of the daemon"
            )
    return Placement(workers, frozenset(allowed) - workers, "")


def cpu_quota(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> float | None:
    """The CPUs' worth of time this process's cgroups let it use (the least quota over its
    cgroup and their parents, cgroup v2's `cpu.max` or v1's `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`); None where none is set or none can be read."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            mounts, read = [root], _v2_quota
        elif "cpu" in controllers.split(","):
            mounts, read = [root / controllers, root / "cpu", root / "cpu,cpuacct"], _v1_quota
        else:
            continue
        parts = [part for part in path.split("/") if part]
        for mount in dict.fromkeys(mounts):
            for depth in range(len(parts), -1, -1):
                with contextlib.suppress(OSError, ValueError, IndexError, ZeroDivisionError):
                    if (limit := read(mount.joinpath(*parts[:depth]))) is not None:
                        limits.append(limit)
    return min(limits) if limits else None


def _v2_quota(folder: Path) -> float | None:
    quota, period = (folder / "cpu.max").read_text().split()[:2]
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(folder: Path) -> float | None:
    quota = int((folder / "cpu.cfs_quota_us").read_text())
    return None if quota <= 0 else quota / int((folder / "cpu.cfs_period_us").read_text())


def allowed_cpus() -> frozenset[int]:
    """The CPUs this thread may run on (empty where the platform cannot say)."""
    getter = getattr(os, "sched_getaffinity", None)
    return frozenset(getter(0)) if getter is not None else frozenset()


def pin_thread(cpus: Set[int]) -> None:
    """The calling thread (and the threads it starts later) onto `cpus`; empty: unchanged."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def pin_process(cpus: Set[int]) -> None:
    """Every thread of this process onto `cpus` (a thread that ends meanwhile is skipped);
    empty: unchanged."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]  # no /proc: the calling thread
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            continue


def place_daemon(setting: str, threads: int, models: int | None) -> Placement:
    """`plan` on this process's CPUs, applied to the process (its `rest`), and logged; the
    workers pin themselves (`pin_thread`) when they start."""
    allowed = allowed_cpus()
    placement = plan(setting, allowed, threads, cpu_quota(), models) if allowed else Placement()
    pin_process(placement.rest)
    log.info("%s", placement.describe())
    return placement
