"""`--worker-cpus`: where the decode workers run (server/placement.py). The plan as a
property of any CPU set; then the real daemon, thread engine and engine process, read from
/proc: its worker threads on the workers' CPUs, every other thread and child on the rest."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from retd.server.app import torch_threads
from retd.server.bench.suites import spawned_otlp_sink
from retd.server.config import ConfigError
from retd.server.config.parsers import cpu_list, parse_cpus
from retd.server.memory import child_pids
from retd.server.placement import Placement, cpu_quota, plan
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import RunningServer, start_server, thread_affinities

cpu_sets = st.frozensets(st.integers(0, 63), min_size=1, max_size=16)


@given(cpu_sets)
def test_a_cpu_list_reads_back_as_written(cpus: frozenset[int]) -> None:
    written = cpu_list(cpus)
    assert parse_cpus(written) == cpus
    assert "," not in written or all(part for part in written.split(","))
    # ranges where CPUs run on: no two neighbours written apart
    assert len(written.split(",")) == 1 + sum(
        1 for cpu in cpus if cpu + 1 not in cpus and cpu != max(cpus)
    )


@given(cpu_sets, st.integers(1, 8), st.none() | st.floats(0.1, 64), st.none() | st.integers(1, 3))
def test_auto_gives_one_models_workers_the_last_cpus_and_leaves_the_rest_one(
    allowed: frozenset[int], threads: int, quota: float | None, models: int | None
) -> None:
    placement = plan("auto", allowed, threads, quota, models)
    shared = quota is not None and quota < len(allowed)
    if models != 1 or len(allowed) <= threads or shared:
        # several models (or a repository's), nothing left for the event loop, or CPUs
        # shared under a quota: unpinned
        assert (placement.workers, placement.rest) == (frozenset(), frozenset())
        assert placement.describe().startswith("threads not pinned (worker_cpus auto: ")
        return
    assert len(placement.workers) == threads
    assert placement.workers | placement.rest == allowed
    assert not placement.workers & placement.rest
    assert min(placement.workers) > max(placement.rest)


@given(cpu_sets, cpu_sets)
def test_a_cpu_list_is_taken_only_within_the_allowed_and_short_of_all(
    allowed: frozenset[int], asked: frozenset[int]
) -> None:
    if asked - allowed or asked >= allowed:
        with pytest.raises(ConfigError, match="worker_cpus: "):
            plan(cpu_list(asked), allowed, 1)
    else:
        placement = plan(cpu_list(asked), allowed, 1, 0.5)  # a list is taken, quota or not
        assert (placement.workers, placement.rest) == (asked, allowed - asked)
    assert plan("none", allowed, 1, 0.5) == Placement()


def test_the_cpu_quota_is_the_least_over_the_cgroup_and_its_parents(tmp_path: Path) -> None:
    membership = tmp_path / "cgroup"
    membership.write_text("0::/pods/retd\n")
    assert cpu_quota(tmp_path, membership) is None  # nothing readable: no quota
    (tmp_path / "pods" / "retd").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "pods" / "retd" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path, membership) is None
    (tmp_path / "pods" / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(tmp_path, membership) == 1.5
    (tmp_path / "pods" / "retd" / "cpu.max").write_text("50000 100000\n")
    assert cpu_quota(tmp_path, membership) == 0.5
    # cgroup v1: the cpu controller's CFS quota over its period
    membership.write_text("4:memory:/x\n3:cpu,cpuacct:/x\n")
    v1 = tmp_path / "cpu,cpuacct" / "x"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path, membership) is None
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    assert cpu_quota(tmp_path, membership) == 3.0


def test_errors_say_which_cpus_and_why() -> None:
    with pytest.raises(ConfigError, match=r"CPU 4-5 is not one this process may run on \(0-3\)"):
        plan("3-5", frozenset(range(4)), 1)
    with pytest.raises(ConfigError, match="leaves no CPU of 0-1 to the event loop"):
        plan("0-1", frozenset({0, 1}), 1)


def start(
    tmp_path: Path, checkpoint: Path, *extra: str, env: dict[str, str] | None = None
) -> RunningServer:
    return start_server(tmp_path, ["--checkpoint", str(checkpoint), *extra], env)


ALLOWED = frozenset(os.sched_getaffinity(0))


@pytest.mark.parametrize("engine", ["thread", "process"])
def test_the_worker_runs_on_its_cpus_and_everything_else_on_the_rest(
    tmp_path: Path, checkpoint: Path, engine: str
) -> None:
    expected = plan("auto", ALLOWED, torch_threads(0), cpu_quota())
    receiver = contextlib.ExitStack()
    sink = receiver.enter_context(spawned_otlp_sink())
    # spans exported 50 ms after a call: the export child starts
    tracing = ["--traces-exporter", "otlp", "--otlp-endpoint", f"http://{sink.address}"]
    quick = {"OTEL_BSP_SCHEDULE_DELAY": "50"}
    server = start(tmp_path, checkpoint, "--engine", engine, *tracing, env=quick)
    try:
        assert expected.describe() in server.log()
        with server.channel() as channel:
            embedding = pb.Embedding(vector=pb.FloatVector(values=[0.5] * 768))
            pb_grpc.DecoderStub(channel).Decode(pb.DecodeRequest(embedding=embedding), timeout=60)
        kids = 2 if engine == "process" else 1  # the export child (and the engine process)
        poll(lambda: len(child_pids(server.process.pid)) == kids, 30, "the export child")
        daemon = thread_affinities(server.process.pid)
        children = {pid: thread_affinities(pid) for pid in child_pids(server.process.pid)}
        if not expected.workers:  # one CPU here, or a quota: auto leaves threads alone
            assert set(daemon) == {ALLOWED}
            return
        worker_threads = [m for masks in [daemon, *children.values()] for m in masks]
        # The one model's worker, and any pool thread torch's OpenMP starts from it (which
        # inherits its CPUs: under the tests' zygote an idle one appeared on a fresh machine).
        assert worker_threads.count(expected.workers) >= 1
        assert set(worker_threads) == {expected.workers, expected.rest}
        if engine == "process":  # the worker is the engine process's, not the daemon's
            assert set(daemon) == {expected.rest}
    finally:
        assert server.stop() == 0, server.log()
        receiver.close()


def test_none_leaves_every_thread_where_it_may_run(tmp_path: Path, checkpoint: Path) -> None:
    server = start(tmp_path, checkpoint, "--worker-cpus", "none")
    try:
        assert set(thread_affinities(server.process.pid)) == {ALLOWED}
        assert "threads not pinned" in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_auto_pins_nothing_for_two_models(tmp_path: Path, checkpoint: Path) -> None:
    server = start_server(
        tmp_path, ["--model", f"a={checkpoint}", "--model", f"b={checkpoint}", "--engine", "thread"]
    )
    try:
        assert "threads not pinned (worker_cpus auto: 2 models, not one)" in server.log()
        assert set(thread_affinities(server.process.pid)) == {ALLOWED}
    finally:
        assert server.stop() == 0, server.log()


def test_a_list_of_every_cpu_stops_the_start_naming_the_setting(
    tmp_path: Path, checkpoint: Path
) -> None:
    with pytest.raises(RuntimeError, match="worker_cpus: .* leaves no CPU"):
        start(tmp_path, checkpoint, "--worker-cpus", cpu_list(ALLOWED))
