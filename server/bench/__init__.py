"""`retd bench`: a load generator in its own process, and the raw-model ceiling.

    retd bench --target 127.0.0.1:50051 --mode decode --concurrency 64 --duration 10
    retd bench --checkpoint DIR --server-args "--max-batch-size 1" --concurrency 64
    retd bench --raw --checkpoint DIR --batch-size 64
    retd bench --checkpoint DIR --replicas 3 --concurrency 64     # balanced over 3 servers
    retd bench --target 127.0.0.1:50051 --model faq --concurrency 1   # one model of several

Against a server, N concurrent callers (asyncio coroutines on one grpc.aio channel) send
requests for M requests or T seconds and the report gives requests/s, generated tokens/s
(bytes/s for a byte-level model), p50/p90/p99 latency, time to the first delta for streams,
and errors by status. With `--checkpoint` (and no `--target`) it starts its own server
subprocess with `--server-args` on a free loopback port and stops it afterwards
(`--replicas R`: R of them). Several replicas (`--target a,b,c`, `dns:///name:port`, or
`--replicas`) are balanced as the client balances them: gRPC's round_robin with its retry
policy. `--raw` times the model alone (no gRPC, no scheduler) with `generate()` at the same
batch size: the ceiling a server can approach. For a phrase bank (its checkpoint's card says
so) `--raw` times its search (the matrix product and top-k) on batches of random unit
queries.

`make bench-peers` (`python -m retd.server.bench.peers`, not re-exported here) runs the same
load against TorchServe serving the same checkpoint: see `peers.py`.
"""

from .cli import add_arguments, config_from_args, main
from .load import LoadGenerator, rss_mib, total_rss_mib
from .raw import raw_params, run_raw
from .report import GENERATE_FIELDS, MODES, BenchConfig, BenchReport, Sample, percentiles
from .spawn import spawned_server, spawned_servers
from .suites import (
    SUITES,
    Scenario,
    issue_suite,
    markdown_table,
    round_ratios,
    run_otlp_sink,
    run_suite,
    sampling_suite,
    spawned_otlp_sink,
    telemetry_suite,
)

__all__ = [
    "GENERATE_FIELDS",
    "MODES",
    "SUITES",
    "BenchConfig",
    "BenchReport",
    "LoadGenerator",
    "Sample",
    "Scenario",
    "add_arguments",
    "config_from_args",
    "issue_suite",
    "main",
    "markdown_table",
    "percentiles",
    "raw_params",
    "round_ratios",
    "rss_mib",
    "run_otlp_sink",
    "run_raw",
    "run_suite",
    "sampling_suite",
    "spawned_otlp_sink",
    "spawned_server",
    "spawned_servers",
    "telemetry_suite",
    "total_rss_mib",
]
