"""The `retd bench` command: its flags (`add_arguments`) and what runs them (`main`).
`retd.server.cli` imports this only for `retd bench`: serving never does."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from retd.model.defaults import STEP_IMPLS

from .load import LoadGenerator
from .raw import run_raw
from .report import MODES, BenchConfig
from .spawn import spawned_servers
from .suites import SUITES, Scenario, markdown_table, round_ratios, run_suite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        help="address of a running server (HOST:PORT), or several replicas to balance over "
        "(HOST:PORT,HOST:PORT,... or dns:///NAME:PORT)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="start a server on this checkpoint (or, with --raw, time the model alone)",
    )
    parser.add_argument(
        "--server-args", default="", help='flags for the started server, e.g. "--max-batch-size 1"'
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="R",
        help="with --checkpoint: start R servers and balance the load over them (default 1)",
    )
    parser.add_argument(
        "--model", default="", help="the model requests name (default: the server's default)"
    )
    parser.add_argument("--mode", choices=MODES, default="decode")
    parser.add_argument("--concurrency", "-c", type=int, default=64, help="concurrent callers")
    parser.add_argument("--requests", "-n", type=int, help="stop after this many requests")
    parser.add_argument(
        "--duration", "-t", type=float, help="seconds to run (default 10 unless --requests)"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load")
    parser.add_argument(
        "--max-new-tokens",
        default="64",
        help="bytes per request: N, or LOW:HIGH drawn uniformly per request (default 64)",
    )
    parser.add_argument(
        "--batch-size", "-b", type=int, default=1, help="items per DecodeBatch/DecodeStream call"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of each call")
    parser.add_argument("--raw", action="store_true", help="time the model alone (no gRPC)")
    parser.add_argument("--device", default="auto", help="device for --raw")
    parser.add_argument("--dtype", default="float32", help="dtype for --raw")
    parser.add_argument(
        "--step-impl",
        choices=STEP_IMPLS,
        default="auto",
        help="how --raw runs decode steps, as `retd serve --step-impl` (default auto)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch threads for --raw; 0 = what the server uses by default",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--suite",
        nargs="?",
        const="batching",
        choices=sorted(SUITES),
        help="run BENCHMARKS.md's comparisons (batching, the default, with greedy and sampled "
        "lines; sampling: greedy against sampled alone; or telemetry) on --checkpoint and "
        "print a markdown table",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="rounds of a suite that repeats its loads (all but batching; 0: its own number): "
        "more rounds, a steadier median on a noisy machine",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    low, _, high = str(args.max_new_tokens).partition(":")
    return BenchConfig(
        mode=args.mode,
        concurrency=args.concurrency,
        requests=args.requests,
        duration=args.duration if args.duration or args.requests else 10.0,
        warmup=args.warmup,
        min_new_tokens=int(low),
        max_new_tokens=int(high or low),
        batch_size=args.batch_size,
        seed=args.seed,
        timeout=args.timeout,
        model=args.model,
    )


def suite_scenarios(name: str, duration: float, rounds: int = 0) -> list[Scenario]:
    """The loads of suite `name`, `rounds` rounds of them if given (0: the suite's own)."""
    suite: Callable[..., list[Scenario]] = SUITES[name]  # some take rounds
    if not rounds:
        return suite(duration)
    if "rounds" not in inspect.signature(suite).parameters:
        raise ValueError(f"--rounds: the {name} suite runs once")
    return suite(duration, rounds=rounds)


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.suite:
        if args.checkpoint is None:
            print("retd bench --suite needs --checkpoint DIR", file=sys.stderr)
            return 2
        try:
            scenarios = suite_scenarios(args.suite, config.duration or 10.0, args.rounds)
        except ValueError as error:
            print(f"retd bench: {error}", file=sys.stderr)
            return 2
        results = run_suite(args.checkpoint, scenarios)
        print(markdown_table(results))
        baselines = {s.name: s.baseline for s in scenarios if s.baseline}
        if ratios := round_ratios(results, baselines):
            print(f"\n{ratios}")
        return 0
    if args.raw:
        if args.checkpoint is None:
            print("retd bench --raw needs --checkpoint DIR", file=sys.stderr)
            return 2
        report = run_raw(
            args.checkpoint, config, args.device, args.dtype, args.torch_threads, args.step_impl
        )
    elif args.target:
        report = asyncio.run(LoadGenerator(args.target, config).run())
    elif args.checkpoint is not None:
        if args.replicas < 1:
            print("retd bench --replicas takes a number >= 1", file=sys.stderr)
            return 2
        with spawned_servers(args.checkpoint, args.server_args, args.replicas) as (addresses, pids):
            report = asyncio.run(LoadGenerator(addresses, config).run(pids))
        report.server_args = args.server_args
    else:
        print("retd bench needs --target HOST:PORT or --checkpoint DIR", file=sys.stderr)
        return 2
    report.extra.setdefault("pid", os.getpid())
    print(json.dumps(asdict(report)) if args.json else report.render(), flush=True)
    return 0
