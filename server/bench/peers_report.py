"""What `retd.server.bench.peers` reports: one measured run (`PeerRun`), the markdown
tables (each server's medians over the rounds, then the ratios retd / peer measured within
each round), and the section of BENCHMARKS.md it writes between two markers."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .report import BenchReport

RETD = "retd"
RETD_PROCESS = "retd, engine process"  # retd with `--engine process`
BEGIN = "<!-- bench-peers: begin (written by `make bench-peers`) -->"
END = "<!-- bench-peers: end -->"
HEADING = "## Against TorchServe (issue 17)"
LATENCIES = ("p50", "p90", "p99")


@dataclass(frozen=True)
class PeerRun:
    """One server's run of one scenario in one round."""

    scenario: str
    server: str  # "retd" or the peer's name
    round: int
    requests_per_s: float
    tokens_per_s: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    rss_mib: float | None = None  # the server's process tree, summed, after the run
    errors: int = 0

    @classmethod
    def from_report(
        cls, scenario: str, server: str, round: int, report: BenchReport, rss_mib: float | None
    ) -> PeerRun:
        return cls(
            scenario=scenario,
            server=server,
            round=round,
            requests_per_s=report.requests_per_s,
            tokens_per_s=report.tokens_per_s,
            latency_ms=dict(report.latency_ms),
            rss_mib=rss_mib,
            errors=sum(report.errors.values()),
        )


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _scenarios(runs: Sequence[PeerRun]) -> list[str]:
    return list(dict.fromkeys(r.scenario for r in runs))


def _servers(runs: Sequence[PeerRun]) -> list[str]:
    names = list(dict.fromkeys(r.server for r in runs))
    return sorted(names, key=lambda name: not name.startswith(RETD))  # retd's first


def servers_table(runs: Sequence[PeerRun], raw_seq_per_s: dict[str, float]) -> str:
    """Each scenario's servers: medians over the rounds; "share of raw": req/s over the raw
    model's seq/s at a batch of as many rows as callers (same lengths, same thread); RSS: the
    largest over the rounds."""
    lines = [
        "| scenario | server | req/s | tokens/s | p50 ms | p90 ms | p99 ms | share of raw "
        "| RSS MiB | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in _scenarios(runs):
        for server in _servers(runs):
            mine = [r for r in runs if r.scenario == scenario and r.server == server]
            if not mine:
                continue
            rps = _median([r.requests_per_s for r in mine])
            latency = {q: _median([r.latency_ms.get(q, 0.0) for r in mine]) for q in LATENCIES}
            raw = raw_seq_per_s.get(scenario)
            rss = [r.rss_mib for r in mine if r.rss_mib is not None]
            lines.append(
                f"| {scenario} | {server} | {rps:.1f} | "
                f"{_median([r.tokens_per_s for r in mine]):.0f} | "
                + " | ".join(f"{latency[q]:.1f}" for q in LATENCIES)
                + f" | {f'{rps / raw:.0%}' if raw else ''} | {f'{max(rss):.0f}' if rss else ''} "
                f"| {sum(r.errors for r in mine)} |"
            )
    return "\n".join(lines)


def ratio_table(runs: Sequence[PeerRun], peer: str, ours: str = RETD) -> str:
    """Per scenario: `ours`'s req/s over the peer's in the same round (median, min, max over
    the rounds); the peer's p50 and p99 over ours (median); the peer's RSS over ours."""
    lines = [
        f"| scenario | req/s {ours} / {peer}, median | min | max | p50 {peer} / {ours} "
        f"| p99 {peer} / {ours} | RSS {peer} / {ours} | rounds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in _scenarios(runs):
        pairs = []
        for round_ in sorted({r.round for r in runs if r.scenario == scenario}):
            found = {r.server: r for r in runs if r.scenario == scenario and r.round == round_}
            if ours in found and peer in found and found[peer].requests_per_s > 0:
                pairs.append((found[ours], found[peer]))
        if not pairs:
            continue
        speed = sorted(ours.requests_per_s / theirs.requests_per_s for ours, theirs in pairs)
        latency = {
            q: _median([t.latency_ms[q] / o.latency_ms[q] for o, t in pairs if o.latency_ms.get(q)])
            for q in ("p50", "p99")
        }
        rss = [t.rss_mib / o.rss_mib for o, t in pairs if o.rss_mib and t.rss_mib is not None]
        lines.append(
            f"| {scenario} | **{_median(speed):.2f}** | {speed[0]:.2f} | {speed[-1]:.2f} | "
            f"{latency['p50']:.2f} | {latency['p99']:.2f} | "
            f"{f'{_median(rss):.2f}' if rss else ''} | {len(pairs)} |"
        )
    return "\n".join(lines)


def write_section(path: Path, block: str) -> None:
    """Put `block` between BENCHMARKS.md's markers (replacing what they held), or append a
    section holding them when it has none."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    marked = f"{BEGIN}\n{block.strip()}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: marked, text, count=1)
    else:
        text = f"{text.rstrip()}\n\n{HEADING}\n\n{marked}\n"
    path.write_text(text)
