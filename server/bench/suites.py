"""`retd bench --suite`: the comparisons BENCHMARKS.md reports (`SUITES`), each a list of
`Scenario`s run in turn on servers of their own, as a markdown table; and the OTLP receiver
that `--suite telemetry` exports spans to."""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from .load import LoadGenerator
from .raw import run_raw
from .report import BenchConfig, BenchReport
from .spawn import PLAIN_GREEDY, spawned_server


@dataclass(frozen=True)
class Scenario:
    """One line of the suite: a load (or --raw) against a server started with `server_args`."""

    name: str
    config: BenchConfig
    server_args: str = ""
    raw: bool = False
    step_impl: str = "auto"  # how a raw scenario runs decode steps (servers: --step-impl)
    reuse_server: bool = False  # run on the scenario before's server if its args are these
    kept: bool = False  # its server stays up to the suite's end (later rounds load it again)
    baseline: str = ""  # the load its round's ratio is over ("": the suite's first)


def issue_suite(duration: float) -> list[Scenario]:
    """The comparisons BENCHMARKS.md reports, measured side by side in one run."""
    fixed = BenchConfig(concurrency=64, duration=duration)
    mixed = replace(fixed, min_new_tokens=8, max_new_tokens=128)
    lone = replace(fixed, concurrency=1)
    batch256 = replace(fixed, mode="decode_batch", batch_size=256, concurrency=1)
    return [
        Scenario("64 callers, batching (max batch 64)", fixed, "--max-batch-size 64"),
        Scenario(
            "64 callers, sampled Generate",
            replace(fixed, mode="generate_default"),
            "--max-batch-size 64",
        ),
        Scenario(
            "64 callers, half Decode half Generate",
            replace(fixed, mode="mixed"),
            "--max-batch-size 64",
        ),
        Scenario("64 callers, max batch 1", fixed, "--max-batch-size 1"),
        Scenario("raw model, batch 64", replace(fixed, batch_size=64), raw=True),
        Scenario("mixed 8..128, continuous", mixed, "--max-batch-size 64"),
        Scenario("mixed 8..128, static", mixed, "--max-batch-size 64 --batching static"),
        Scenario("1 caller, batching (max batch 64)", lone, "--max-batch-size 64"),
        Scenario("1 caller, max batch 1", lone, "--max-batch-size 1"),
        Scenario("DecodeBatch of 256, one call", batch256, "--max-batch-size 256"),
        Scenario("raw model, batch 256", replace(batch256, mode="decode"), raw=True),
    ]


def sampling_suite(duration: float, rounds: int = 4) -> list[Scenario]:
    """Greedy Decode against sampled Generate (plain, filtered, and half of each in one
    batch) at 64 callers on one server, in `rounds` interleaved rounds, every other one in
    reverse order (a noisy machine slows neighbours alike: `round_ratios` compares within a
    round; each load follows each of its neighbours as often); then 1 caller each way and the
    raw model each way (no gRPC, no scheduler)."""
    fixed = BenchConfig(concurrency=64, duration=duration)
    lone = replace(fixed, concurrency=1)
    raw = replace(fixed, batch_size=64)
    server = "--max-batch-size 64"
    loads = [
        ("64 callers, greedy Decode", fixed),
        ("64 callers, sampled Generate", replace(fixed, mode="generate_default")),
        ("64 callers, half Decode half Generate", replace(fixed, mode="mixed")),
        ("64 callers, Generate top-k 50 top-p 0.95", replace(fixed, mode="generate_filtered")),
    ]
    return [
        *(
            Scenario(name, config, server, reuse_server=True)
            for r in range(rounds)
            for name, config in (loads if r % 2 == 0 else loads[::-1])
        ),
        Scenario("1 caller, greedy Decode", lone, server, reuse_server=True),
        Scenario(
            "1 caller, sampled Generate",
            replace(lone, mode="generate_default"),
            server,
            reuse_server=True,
        ),
        Scenario("raw model, batch 64, greedy", raw, raw=True),
        Scenario("raw model, batch 64, sampled", replace(raw, mode="generate_default"), raw=True),
    ]


def telemetry_suite(duration: float, rounds: int = 6) -> list[Scenario]:
    """Tracing off against tracing on (every span sampled, exported by OTLP to a receiver
    on loopback) at 64 callers, with the thread engine and with the engine process: four
    servers kept up side by side and loaded in turn, `rounds` rounds, every other one in
    reverse order (each on/off pair back to back, each first as often as second: this
    machine's speed drifts within minutes; the ratios compare within a round)."""
    fixed = BenchConfig(concurrency=64, duration=duration)
    tracing = {
        "off": " --traces-exporter none",
        "on (100%, OTLP to loopback)": " --traces-exporter otlp --otlp-endpoint http://{otlp}",
    }
    engines = {"": "", ", engine process": " --engine process"}
    loads = [
        Scenario(
            f"tracing {state}{engine}",
            fixed,
            "--max-batch-size 64" + flags + engine_flags,
            kept=True,
            baseline=f"tracing off{engine}" if state != "off" else "",  # "": the first
        )
        for engine, engine_flags in engines.items()
        for state, flags in tracing.items()
    ]
    return [load for r in range(rounds) for load in (loads if r % 2 == 0 else loads[::-1])]


def step_suite(duration: float, rounds: int = 3) -> list[Scenario]:
    """The decode steps side by side (`--step-impl`): a lone 64-byte Decode each way in
    `rounds` interleaved rounds (Decode's default loop breakers, as callers get them); then 64
    callers each way and the raw model at batch 64 each way, both plain greedy (the same work,
    for the server's share of the raw model); and the prefix step with tracing on (every span,
    OTLP to loopback) and in an engine process."""
    fixed = BenchConfig(concurrency=64, duration=duration)
    lone = replace(fixed, concurrency=1)
    raw = replace(fixed, batch_size=64)
    impls = ("eager", "cpp", "prefix")
    label = {"eager": "eager step", "cpp": "C++ step", "prefix": "C++ prefix step"}
    server = {impl: f"--max-batch-size 64 --step-impl {impl}" for impl in impls}
    greedy = f" {PLAIN_GREEDY}"
    tracing = " --traces-exporter otlp --otlp-endpoint http://{otlp}"
    return [
        *(
            Scenario(f"1 caller, {label[impl]}", lone, server[impl])
            for _ in range(rounds)
            for impl in impls
        ),
        *(Scenario(f"64 callers, {label[impl]}", fixed, server[impl] + greedy) for impl in impls),
        *(
            Scenario(f"raw model, batch 64, {label[impl]}", raw, raw=True, step_impl=impl)
            for impl in impls
        ),
        Scenario(
            "64 callers, C++ prefix step, tracing on (100%, OTLP)",
            fixed,
            server["prefix"] + greedy + tracing,
        ),
        Scenario(
            "64 callers, C++ prefix step, engine process",
            fixed,
            server["prefix"] + greedy + " --engine process",
        ),
    ]


def steps_suite(duration: float, rounds: int = 2) -> list[Scenario]:
    """Several greedy steps a call (`--steps-per-call`) against one, the prefix step each
    way: 64 callers (plain greedy, for the share of the raw model) in `rounds` interleaved
    rounds of 1, 4 and 8 steps a call; 64 callers with Decode's default loop breakers; the
    engine process; a lone 64-byte Decode; and the raw model at batch 64."""
    fixed = BenchConfig(concurrency=64, duration=duration)
    lone = replace(fixed, concurrency=1)
    server = "--max-batch-size 64 --steps-per-call {k}"
    greedy = f" {PLAIN_GREEDY}"
    calls = {k: f"{k} step{'s' if k > 1 else ''} a call" for k in (1, 4, 8)}
    return [
        *(
            Scenario(f"64 callers, {calls[k]}", fixed, server.format(k=k) + greedy)
            for _ in range(rounds)
            for k in (1, 4, 8)
        ),
        *(
            Scenario(f"64 callers, Decode's defaults, {calls[k]}", fixed, server.format(k=k))
            for k in (1, 4)
        ),
        *(
            Scenario(
                f"64 callers, engine process, {calls[k]}",
                fixed,
                server.format(k=k) + greedy + " --engine process",
            )
            for k in (1, 4)
        ),
        *(Scenario(f"1 caller, {calls[k]}", lone, server.format(k=k)) for k in (1, 4)),
        Scenario("raw model, batch 64", replace(fixed, batch_size=64), raw=True),
    ]


def drafts_suite(duration: float, rounds: int = 3) -> list[Scenario]:
    """Speculation on n-gram drafts (`--draft-tokens`, default 2) against none, in `rounds`
    interleaved rounds: 64 callers of plain greedy 8..128-token requests (the rows that loop
    are the tail), with the engine process and the default 32 slots, and with 64 slots; then
    64 callers with Decode's default loop breakers (whose rows do not guess) each way."""
    mixed = BenchConfig(concurrency=64, duration=duration, min_new_tokens=8, max_new_tokens=128)
    engine = " --engine process"
    drafts = {0: "no drafts", 2: "drafts of 2"}
    return [
        *(
            Scenario(
                f"mixed, plain greedy, {slots} slots, {drafts[k]}",
                mixed,
                f"--max-batch-size {slots} --draft-tokens {k} {PLAIN_GREEDY}{engine}",
            )
            for _ in range(rounds)
            for slots in (32, 64)
            for k in drafts
        ),
        *(
            Scenario(
                f"mixed, Decode's defaults, 32 slots, {drafts[k]}",
                mixed,
                f"--draft-tokens {k}{engine}",
            )
            for k in drafts
        ),
    ]


SUITES = {
    "batching": issue_suite,
    "sampling": sampling_suite,
    "telemetry": telemetry_suite,
    "step": step_suite,
    "steps": steps_suite,
    "drafts": drafts_suite,
}


def run_otlp_sink(ready: str) -> None:
    """An OTLP/gRPC trace receiver that counts what it gets (for `--suite telemetry`);
    writes its address to `ready`, the spans it has had so far to `ready`.spans, and serves
    until killed."""
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import (
        trace_service_pb2,
        trace_service_pb2_grpc,
    )

    counted = Path(f"{ready}.spans")

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        spans = 0

        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC's name)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    Sink.spans += len(scope.spans)
            counted.write_text(str(Sink.spans))
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # one writer of the count
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(ready).write_text(f"127.0.0.1:{port}")
    server.wait_for_termination()


@dataclass(frozen=True)
class OtlpSink:
    """A running `run_otlp_sink`: its address, and how many spans it has received."""

    address: str
    ready: Path

    def spans(self) -> int:
        counted = Path(f"{self.ready}.spans")
        return int(counted.read_text() or 0) if counted.exists() else 0


@contextlib.contextmanager
def spawned_otlp_sink() -> Iterator[OtlpSink]:
    """`run_otlp_sink` in a process of its own."""
    with tempfile.TemporaryDirectory() as folder:
        ready = Path(folder) / "sink"
        code = f"from retd.server.bench.suites import run_otlp_sink; run_otlp_sink({str(ready)!r})"
        process = subprocess.Popen([sys.executable, "-c", code])
        try:
            deadline = time.monotonic() + 60
            while not ready.exists() or not ready.read_text():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the OTLP receiver did not start")
                time.sleep(0.05)
            yield OtlpSink(ready.read_text(), ready)
        finally:
            process.kill()
            process.wait()


def run_suite(checkpoint: Path, scenarios: Sequence[Scenario]) -> list[tuple[str, BenchReport]]:
    """Each scenario in turn, on a server of its own unless it reuses the one before it or
    one kept up. Servers that export spans share one OTLP receiver; once they have stopped
    (and flushed), the spans it received are printed beside the calls those servers were
    sent, so a load that dropped spans shows."""
    results = []
    calls = 0
    with (
        contextlib.ExitStack() as sink_stack,
        contextlib.ExitStack() as kept_stack,
        contextlib.ExitStack() as stack,
    ):
        sink: OtlpSink | None = None

        def spawn(server_args: str, on: contextlib.ExitStack) -> tuple[str, int]:
            nonlocal sink
            if "{otlp}" in server_args:
                sink = sink or sink_stack.enter_context(spawned_otlp_sink())
                server_args = server_args.format(otlp=sink.address)
            return on.enter_context(spawned_server(checkpoint, server_args))

        kept: dict[str, tuple[str, int]] = {}  # a kept server's args: its address and pid
        server: tuple[str, str, int] | None = None  # its server_args, address and pid
        for scenario in scenarios:
            if scenario.raw:
                stack.close()  # no idle server beside the model
                server = None
                report = run_raw(
                    checkpoint, scenario.config, "auto", "float32", step_impl=scenario.step_impl
                )
            else:
                args = scenario.server_args
                if scenario.kept:
                    if args not in kept:
                        kept[args] = spawn(args, kept_stack)
                    server = (args, *kept[args])
                elif not (scenario.reuse_server and server and server[0] == args):
                    stack.close()
                    server = (args, *spawn(args, stack))
                report = asyncio.run(LoadGenerator(server[1], scenario.config).run(server[2]))
                report.server_args = args
                if "{otlp}" in args:
                    warm = report.extra.get("warmup_requests", 0)
                    calls += report.requests + (warm if isinstance(warm, int) else 0)
            print(f"{scenario.name}\n{report.render()}", file=sys.stderr, flush=True)
            results.append((scenario.name, report))
        stack.close()
        kept_stack.close()
        if sink is not None:
            print(f"OTLP receiver: {sink.spans()} spans for {calls} calls", file=sys.stderr)
    return results


def round_ratios(
    results: Sequence[tuple[str, BenchReport]], baselines: Mapping[str, str] | None = None
) -> str:
    """For a suite that repeats its loads in rounds (a round ends where a load repeats):
    each load's tokens/s over its baseline's in the same round (`baselines`: load -> the
    load it is compared to; the suite's first load otherwise), median, the median's 95%
    interval (`median_interval`) and range over the rounds. Empty if no load repeats."""
    rounds: list[dict[str, float]] = [{}]
    for name, report in results:
        if name in rounds[-1]:
            rounds.append({})
        rounds[-1][name] = report.tokens_per_s
    if len(rounds) < 2:
        return ""
    first = results[0][0]
    lines = [
        "| load | over | tokens/s ×, median | 95% interval | min | max | rounds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in dict.fromkeys(name for name, _ in results):
        over = (baselines or {}).get(name, first)
        ratios = sorted(r[name] / r[over] for r in rounds if name in r and over in r)
        if len(ratios) >= 2:
            median = float(np.median(ratios))
            interval = median_interval(ratios)
            within = "—" if interval is None else f"{interval[0]:.2f}–{interval[1]:.2f}"
            lines.append(
                f"| {name} | {over} | {median:.2f} | {within} | {ratios[0]:.2f} "
                f"| {ratios[-1]:.2f} | {len(ratios)} |"
            )
    return "\n".join(lines)


def median_interval(
    values: Sequence[float], confidence: float = 0.95
) -> tuple[float, float] | None:
    """A distribution-free interval for the median of what `values` were drawn from
    (independent draws): the k-th smallest and the k-th largest value, k the largest for
    which fewer than k of n draws fall below the median with probability at most
    (1 - confidence) / 2 (the binomial law, p = 1/2). None when n is too small for any
    (fewer than 6 values at 95%). With 10 values: the 2nd and the 9th (97.9%)."""
    n, tail = len(values), (1 - confidence) / 2
    k, below = 0, 0.0  # below: P(fewer than k+1 draws under the median)
    while k < n // 2 and (below := below + math.comb(n, k) / 2**n) <= tail:
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def markdown_table(results: Sequence[tuple[str, BenchReport]]) -> str:
    """One row per scenario; "× row 1": its tokens/s over the first scenario's; tokens/seq: the
    mean tokens a sequence generated (fewer than asked when it ended with EOS)."""
    lines = [
        "| scenario | seq/s | tokens/s | × row 1 | tokens/seq | p50 ms | p90 ms | p99 ms "
        "| short p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    first = results[0][1].tokens_per_s if results else 0.0
    for name, r in results:
        latency = r.latency_ms
        short = r.short_latency_ms.get("p99")
        ratio = f"{r.tokens_per_s / first:.2f}" if first else ""
        per_sequence = r.tokens_per_s / r.sequences_per_s if r.sequences_per_s else 0.0
        lines.append(
            f"| {name} | {r.sequences_per_s:.1f} | {r.tokens_per_s:.0f} | {ratio} | "
            f"{per_sequence:.1f} | "
            f"{latency.get('p50', 0):.1f} | {latency.get('p90', 0):.1f} | "
            f"{latency.get('p99', 0):.1f} | {'' if short is None else f'{short:.1f}'} | "
            f"{sum(r.errors.values())} |"
        )
    return "\n".join(lines)
