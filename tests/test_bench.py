"""`retd bench` runs in its own process against a real server and reports what it measured."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import RunningServer, thread_affinities


def bench(*args: str) -> dict[str, Any]:
    run = subprocess.run(
        [str(Path(sys.executable).parent / "retd"), "bench", "--json", "--warmup", "0", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.parametrize(
    ("mode", "batch"),
    [("decode", 1), ("generate", 1), ("generate_stream", 1), ("decode_batch", 3),
     ("decode_stream", 3), ("generate_default", 1), ("generate_filtered", 1), ("mixed", 1)],
)  # fmt: skip
def test_bench_modes_against_a_server(server: RunningServer, mode: str, batch: int) -> None:
    report = bench(
        "--target", server.address, "--mode", mode, "-c", "4", "-n", "12",
        "--max-new-tokens", "4:12", "-b", str(batch),
    )  # fmt: skip
    assert report["errors"] == {}
    assert report["requests"] == 12
    assert report["sequences"] == 12 * batch
    assert 12 * batch * 4 <= report["tokens_per_s"] * report["seconds"] <= 12 * batch * 12
    assert set(report["latency_ms"]) == {"p50", "p90", "p99"}
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert bool(report["first_delta_ms"]) == (mode in ("generate_stream", "decode_stream"))


def test_bench_counts_errors_by_status(server: RunningServer) -> None:
    report = bench(
        "--target", server.address, "-c", "2", "-n", "4", "--max-new-tokens", "256",
        "--timeout", "0.001",
    )  # fmt: skip
    assert report["errors"] == {"DEADLINE_EXCEEDED": 4}


def test_bench_starts_its_own_server_and_times_the_raw_model(checkpoint: Path) -> None:
    served = bench(
        "--checkpoint", str(checkpoint), "--server-args", "--max-batch-size 2", "-c", "3",
        "-n", "6", "--max-new-tokens", "8",
    )  # fmt: skip
    assert served["server_args"] == "--max-batch-size 2" and served["errors"] == {}
    raw = bench("--raw", "--checkpoint", str(checkpoint), "-b", "4", "-n", "8",
                "--max-new-tokens", "8")  # fmt: skip
    assert raw["raw"] and raw["sequences"] == 8 and raw["batch_size"] == 4
    assert raw["extra"]["step_impl"] == "prefix"  # auto, where the C++ step builds
    sampled = bench("--raw", "--checkpoint", str(checkpoint), "-b", "4", "-n", "8",
                    "--max-new-tokens", "8", "--mode", "mixed", "--step-impl", "eager")  # fmt: skip
    assert sampled["sequences"] == 8 and sampled["tokens_per_s"] > 0
    assert sampled["extra"]["step_impl"] == "eager"


def test_raw_batches_are_sampled_as_the_mode_asks() -> None:
    from retd.model.generation import SamplingParams
    from retd.server.bench import raw_params

    greedy = raw_params(SamplingParams, "decode", 1, 8, 5)
    assert greedy == SamplingParams(8)
    default = raw_params(SamplingParams, "generate_default", 0, 8, 5)
    assert (default.temperature, default.top_k, default.top_p, default.seed) == (1.0, 0, 1.0, 5)
    filtered = raw_params(SamplingParams, "generate_filtered", 0, 8, 5)
    assert (filtered.top_k, filtered.top_p, filtered.seed) == (50, 0.95, 5)
    mixed = [raw_params(SamplingParams, "mixed", i, 8, i).greedy for i in range(4)]
    assert mixed == [True, False, True, False]


def test_bench_balances_over_replicas(server: RunningServer, checkpoint: Path) -> None:
    report = bench(
        "--checkpoint", str(checkpoint), "--replicas", "2", "-c", "4", "-n", "12",
        "--max-new-tokens", "8",
    )  # fmt: skip
    assert report["errors"] == {} and report["requests"] == 12
    assert report["extra"]["replicas"] == 2
    assert report["extra"]["server_rss_mib_before"] > 2 * 50  # two daemons' RSS, summed
    listed = bench("--target", f"{server.address},{server.address}", "-c", "2", "-n", "4")
    assert listed["errors"] == {} and listed["requests"] == 4


def test_replicas_leave_their_threads_unpinned(checkpoint: Path) -> None:
    """Several daemons on one machine must not all pin their workers to its last CPUs."""
    from retd.server.bench import spawned_servers

    allowed = frozenset(os.sched_getaffinity(0))
    with spawned_servers(checkpoint, "--torch-threads 1", 2) as (_, pids):
        assert all(set(thread_affinities(pid)) == {allowed} for pid in pids)


def test_round_ratios_compare_each_load_within_its_round() -> None:
    from retd.server.bench import BenchReport, round_ratios

    def report(bytes_per_s: float) -> BenchReport:
        return BenchReport("decode", 64, 1, "64", 1.0, 1, 1, 1.0, 1.0, bytes_per_s, {}, {}, {}, {})

    results = [("greedy", report(100)), ("sampled", report(90)), ("greedy", report(200))]
    results += [("sampled", report(190)), ("1 caller", report(5))]
    table = round_ratios(results).splitlines()
    assert table[2] == "| greedy | greedy | 1.00 | — | 1.00 | 1.00 | 2 |"
    assert table[3] == "| sampled | greedy | 0.93 | — | 0.90 | 0.95 | 2 |"  # not 280/300
    assert len(table) == 4  # a load of one round only has no ratio
    assert round_ratios(results[:2]) == ""


def test_round_ratios_of_rotated_rounds_over_their_own_baselines() -> None:
    """Rounds that start one load later each time (the telemetry suite's), each load over the
    baseline it names."""
    from retd.server.bench import BenchReport, round_ratios

    def report(bytes_per_s: float) -> BenchReport:
        return BenchReport("decode", 64, 1, "64", 1.0, 1, 1, 1.0, 1.0, bytes_per_s, {}, {}, {}, {})

    rounds = [
        [("off", 100), ("on", 95), ("off p", 150), ("on p", 120)],
        [("on", 180), ("off p", 300), ("on p", 290), ("off", 200)],
        [("off p", 100), ("on p", 99), ("off", 70), ("on", 63)],
    ]
    results = [(name, report(value)) for loads in rounds for name, value in loads]
    table = round_ratios(results, {"on": "off", "on p": "off p"}).splitlines()
    assert table[2:] == [
        "| off | off | 1.00 | — | 1.00 | 1.00 | 3 |",
        "| on | off | 0.90 | — | 0.90 | 0.95 | 3 |",
        "| off p | off | 1.50 | — | 1.43 | 1.50 | 3 |",
        "| on p | off p | 0.97 | — | 0.80 | 0.99 | 3 |",
    ]


def test_ten_rounds_give_the_medians_interval() -> None:
    """With 10 rounds the interval is the 2nd and 9th ratio (97.9%)."""
    from retd.server.bench import BenchReport, round_ratios

    def report(bytes_per_s: float) -> BenchReport:
        return BenchReport("decode", 64, 1, "64", 1.0, 1, 1, 1.0, 1.0, bytes_per_s, {}, {}, {}, {})

    on = [90, 97, 93, 88, 95, 99, 91, 94, 96, 92]  # over 100 each round
    results = [(name, report(v)) for r in on for name, v in (("off", 100), ("on", r))]
    assert (
        round_ratios(results).splitlines()[3]
        == "| on | off | 0.94 | 0.90–0.97 | 0.88 | 0.99 | 10 |"
    )


@settings(max_examples=30, deadline=None)
@given(st.integers(6, 60), st.integers(0, 2**32 - 1))
def test_the_median_interval_covers_the_median_as_often_as_it_says(n: int, seed: int) -> None:
    """Samples of n from a skewed law (exponential, median ln 2): the interval holds the true
    median in 95% of 2,000 samples or more (less 2% for the draw), and always holds the
    sample's own median. (How narrow it is: the examples of the test above and below.)"""
    from retd.server.bench.suites import median_interval

    rng = np.random.default_rng(seed)
    samples = rng.exponential(size=(2000, n))
    covered = 0
    for sample in samples:
        interval = median_interval(list(sample))
        assert interval is not None
        low, high = interval
        assert low <= float(np.median(sample)) <= high
        covered += low <= math.log(2) <= high
    assert covered / 2000 >= 0.93


def test_too_few_rounds_have_no_interval() -> None:
    from retd.server.bench.suites import median_interval

    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    assert median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)


def test_serving_never_imports_the_bench() -> None:
    """`retd serve` (its command line and the app it runs) loads no module of
    `retd.server.bench`; `retd bench` does."""
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        import retd.server.app
        from retd.client.cli import main
        for argv in (["serve", "--help"], ["init-checkpoint", "--help"]):
            with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
                main(argv)
        loaded = sorted(name for name in sys.modules if name.startswith("retd.server.bench"))
        assert not loaded, loaded
        with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
            main(["bench", "--help"])
        assert "retd.server.bench" in sys.modules
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_kept_servers_are_loaded_in_turn_and_their_spans_counted(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suite whose servers stay up (the telemetry suite's way): each server starts once
    and serves each of its rounds; the OTLP receiver's count of spans, printed once the
    servers have flushed, covers every call sent to the server that traces."""
    from retd.server.bench import BenchConfig, Scenario, run_suite, suites

    started: list[str] = []
    spawn = suites.spawned_server

    def spawned_server(checkpoint: Path, server_args: str) -> Any:
        started.append(server_args)
        return spawn(checkpoint, server_args)

    monkeypatch.setattr(suites, "spawned_server", spawned_server)
    config = BenchConfig(
        concurrency=2, duration=0.3, warmup=0.2, min_new_tokens=4, max_new_tokens=4
    )
    traced = "--max-batch-size 4 --traces-exporter otlp --otlp-endpoint http://{otlp}"
    loads = [
        Scenario("off", config, "--max-batch-size 4 --traces-exporter none", kept=True),
        Scenario("on", config, traced, kept=True, baseline="off"),
    ]
    results = run_suite(checkpoint, [*loads, *reversed(loads)])
    assert [name for name, _ in results] == ["off", "on", "on", "off"]
    assert len(started) == 2 and "--traces-exporter none" in started[0]
    assert all(r.errors == {} and r.requests > 0 for _, r in results)
    calls = sum(r.requests + r.extra["warmup_requests"] for name, r in results if name == "on")
    log = capsys.readouterr().err
    received = int(log.split("OTLP receiver: ")[1].split()[0])
    assert f"spans for {calls} calls" in log and received >= calls


def test_rounds_repeat_a_suites_loads() -> None:
    """`--rounds N`: N rounds of a suite's loads (its own number without it); a suite that
    runs once says so."""
    from retd.server.bench.cli import suite_scenarios

    own = suite_scenarios("telemetry", 1.0)
    three = suite_scenarios("telemetry", 1.0, rounds=3)
    assert len(own) == 6 * 4 and len(three) == 3 * 4
    assert [s.name for s in three] == [s.name for s in own[:12]]
    with pytest.raises(ValueError, match="--rounds: the batching suite runs once"):
        suite_scenarios("batching", 1.0, rounds=3)
    run = subprocess.run(
        [str(Path(sys.executable).parent / "retd"), "bench", "--suite", "--rounds", "2",
         "--checkpoint", "unused"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2 and "the batching suite runs once" in run.stderr


def test_the_sampling_suite_reverses_every_other_round() -> None:
    """Each round has each 64-caller load once, every other round in reverse, and
    `round_ratios` still finds the rounds (a round ends where a load repeats)."""
    from retd.server.bench import BenchReport, round_ratios
    from retd.server.bench.cli import suite_scenarios

    scenarios = suite_scenarios("sampling", 1.0, rounds=4)
    loads = [s.name for s in scenarios if s.name.startswith("64 callers")]
    first = loads[:4]
    assert len(set(first)) == 4 and loads == first + first[::-1] + first + first[::-1]

    def report(tokens_per_s: float) -> BenchReport:
        return BenchReport("decode", 64, 1, "64", 1.0, 1, 1, 1.0, 1.0, tokens_per_s, {}, {}, {}, {})

    # each load a fixed share of its round's greedy Decode, whatever its place in the round
    share = dict(zip(first, (1.0, 0.9, 0.8, 0.5), strict=True))
    results = [(name, report(100 * (i // 4 + 1) * share[name])) for i, name in enumerate(loads)]
    table = round_ratios(results).splitlines()[2:]
    assert [row.split(" | ")[2] for row in table] == ["1.00", "0.90", "0.80", "0.50"]
    assert all(row.endswith("| 4 |") for row in table)
