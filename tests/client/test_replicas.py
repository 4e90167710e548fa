"""Several replicas behind one client: real daemons on loopback ports, load through one
client, replicas SIGKILLed, SIGTERMed and restarted mid-load; the calls each replica served
are read from its own Prometheus endpoint."""

from __future__ import annotations

import asyncio
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from retd.client import AsyncClient, Client, UnavailableError
from tests._wait import poll
from tests.client.conftest import embeddings
from tests.conftest import RunningServer, start_server

GRACE_PERIOD_S = 5.0
#: Reconnect to a restarted replica within a second (gRPC's default backoff starts at 1 s and
#: grows to 120 s): a channel option any caller may set.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
POLL_S = 30.0
TOKENS = 32
E = embeddings(8, seed=21)
LOAD_METHODS = ("Decode", "DecodeBatch", "Generate")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Replica:
    server: RunningServer
    metrics_port: int

    @property
    def address(self) -> str:
        return self.server.address

    def scrape(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {family.name: family for family in text_string_to_metric_families(text)}

    def served(self, methods: tuple[str, ...] = LOAD_METHODS) -> int:
        """Calls of `methods` this replica has answered (any status)."""
        family = self.scrape().get("retd_requests")  # absent until the first call
        if family is None:
            return 0
        return int(
            sum(
                s.value
                for s in family.samples
                if s.name == "retd_requests_total" and s.labels.get("rpc_method") in methods
            )
        )

    def in_flight(self) -> int:
        family = self.scrape()["retd_requests_in_flight"]
        return int(sum(s.value for s in family.samples))

    def refusals(self) -> int:
        """Calls this replica turned away while draining (its access log)."""
        return sum(" UNAVAILABLE " in line for line in self.server.log().splitlines())


def start_replica(
    tmp_path: Path, checkpoint: Path, *extra: str, port: int | None = None
) -> Replica:
    metrics_port = free_port()
    args = ["--checkpoint", str(checkpoint), "--metrics-port", str(metrics_port), *extra]
    args += ["--grace-period", str(GRACE_PERIOD_S), "--access-log", "on"]  # refusals()
    if port is not None:  # after start_server's own --port 0: this one wins
        args += ["--port", str(port)]
    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # its own ready file and log
    return Replica(start_server(folder, args), metrics_port)


def start_replicas(tmp_path: Path, checkpoint: Path, count: int, *extra: str) -> list[Replica]:
    """`count` replicas started side by side (each start loads torch and warms a model up)."""
    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(start_replica, tmp_path, checkpoint, *extra) for _ in range(count)]
        started = [f.exception() or f.result() for f in futures]
    failed = [r for r in started if isinstance(r, BaseException)]
    if failed:
        stop_all([r for r in started if isinstance(r, Replica)])
        raise failed[0]
    return [r for r in started if isinstance(r, Replica)]


def stop_all(replicas: list[Replica]) -> None:
    for replica in replicas:
        if replica.server.process.poll() is None:
            replica.server.process.kill()
            replica.server.process.wait(timeout=30)


# ---- failover under load ------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    index: int
    text: str | None
    error: str | None


@dataclass
class Load:
    """`callers` threads calling through one client until stopped: Decode, DecodeBatch, a
    seeded sampled Generate and a greedy Generate in turn (or only the `kinds` given)."""

    KINDS = ("decode", "batch", "seeded", "greedy")

    client: Client
    callers: int = 4
    kinds: tuple[str, ...] = KINDS
    tokens: int = TOKENS
    outcomes: list[Outcome] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    @staticmethod
    def call(client: Client, kind: str, index: int, tokens: int = TOKENS) -> str:
        e = E[index]
        if kind == "decode":
            return client.decode(e, max_new_tokens=tokens).text
        if kind == "batch":
            items = client.decode_batch([e, E[-1 - index]], max_new_tokens=tokens)
            return "|".join(item.unwrap().text for item in items)
        if kind == "seeded":
            return client.generate(e, max_new_tokens=tokens, temperature=0.8, seed=index).text
        return client.generate(e, max_new_tokens=tokens, temperature=0).text

    def _caller(self, number: int) -> None:
        turn = number
        while not self.stopping.is_set():
            kind, index = self.kinds[turn % len(self.kinds)], turn % len(E)
            turn += 1
            try:
                text = self.call(self.client, kind, index, self.tokens)
                outcome = Outcome(kind, index, text, None)
            except Exception as err:  # every failure is recorded and fails the test
                outcome = Outcome(kind, index, None, repr(err))
            with self.lock:
                self.outcomes.append(outcome)

    def start(self) -> None:
        self.threads = [
            threading.Thread(target=self._caller, args=(n,), daemon=True)
            for n in range(self.callers)
        ]
        for thread in self.threads:
            thread.start()

    def done(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def stop(self) -> list[Outcome]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "a caller is stuck"
        return list(self.outcomes)


def spread_once_in_rotation(replicas: list[Replica], what: str) -> list[int]:
    """Wait until every replica is in rotation (a few calls each: a restarted one must first be
    reconnected), then count a window of calls: round_robin shares it fairly."""
    serve_more(replicas, 3, f"{what} (all in rotation)")
    deltas = serve_more(replicas, 30, what)
    assert_spread(deltas)
    return deltas


def serve_more(replicas: list[Replica], calls: int, what: str) -> list[int]:
    """Bounded poll until each replica has served `calls` more calls than now; their counts."""
    since = [r.served() for r in replicas]

    def grown() -> list[int] | None:
        deltas = [r.served() - s for r, s in zip(replicas, since, strict=True)]
        return deltas if min(deltas) >= calls else None

    return poll(grown, POLL_S, what)


def assert_spread(deltas: list[int]) -> None:
    """round_robin: each live replica gets a fair share (exact shares drift with timing)."""
    assert min(deltas) >= 0.5 * sum(deltas) / len(deltas), deltas


@pytest.mark.slow
def test_failover_under_load_loses_no_call(tmp_path: Path, checkpoint: Path) -> None:
    replicas = start_replicas(tmp_path, checkpoint, 3)
    try:
        with Client(replicas[2].address, timeout=30) as direct:  # the reference answers
            expected = {
                (kind, index): Load.call(direct, kind, index)
                for kind in Load.KINDS
                for index in range(len(E))
            }
        started = time.monotonic()
        client = Client([r.address for r in replicas], timeout=30, options=FAST_RECONNECT)
        assert client.balanced and client.target.startswith("ipv4:")
        load = Load(client)
        load.start()
        report: dict[str, Any] = {}
        try:
            # 1. Three replicas share the load.
            deltas = spread_once_in_rotation(replicas, "three replicas serving")
            report["three"] = deltas

            # 2. SIGKILL one with calls in flight: they are retried on the others.
            victim, rest = replicas[0], replicas[1:]
            poll(lambda: victim.in_flight() > 0, POLL_S, "a call in flight on the victim")
            victim.server.process.send_signal(signal.SIGKILL)
            assert victim.server.process.wait(timeout=30) == -signal.SIGKILL
            deltas = spread_once_in_rotation(rest, "two replicas serving")
            report["after SIGKILL"] = deltas

            # 3. SIGTERM another with calls in flight: it drains and exits 0.
            drained, survivor = replicas[1], replicas[2]
            poll(lambda: drained.in_flight() > 0, POLL_S, "a call in flight on the drained")
            drained.server.process.send_signal(signal.SIGTERM)
            assert drained.server.process.wait(timeout=GRACE_PERIOD_S + 30) == 0
            report["refused while draining"] = drained.refusals()
            report["survivor alone"] = serve_more([survivor], 30, "the survivor serving alone")

            # 4. A replica restarted on the killed one's port gets traffic again.
            port = victim.server.port
            restarted = start_replica(tmp_path, checkpoint, port=port)
            replicas.append(restarted)
            assert restarted.server.port == port
            deltas = spread_once_in_rotation([restarted, survivor], "the restarted serving")
            report["restarted and survivor"] = deltas
        finally:
            outcomes = load.stop()
            client.close()
        report["seconds"] = round(time.monotonic() - started, 1)
        report["calls"] = dict(Counter(o.kind for o in outcomes))
        print(f"failover: {len(outcomes)} calls, {report}")

        failed = [o for o in outcomes if o.error is not None]
        assert not failed, (len(failed), failed[:5])
        wrong = [o for o in outcomes if o.text != expected[(o.kind, o.index)]]
        assert not wrong, (len(wrong), wrong[:5])
        assert set(Counter(o.kind for o in outcomes)) == set(Load.KINDS)
    finally:
        stop_all(replicas)


@pytest.mark.slow
def test_drains_under_heavy_load_lose_no_call(tmp_path: Path, checkpoint: Path) -> None:
    """32 callers of short Decodes over four replicas; three are SIGTERMed one after the
    other. Calls reach a draining replica before the client sees its health turn
    NOT_SERVING: the gate refuses them (UNAVAILABLE; its last refusals are held until the
    listener has closed, so that none is cancelled by gRPC: see `CallGate.quiesce` and
    tests/faults/test_shutdown_storm.py). The client retries them on another replica."""
    replicas = start_replicas(tmp_path, checkpoint, 4)
    try:
        with Client(replicas[-1].address, timeout=30) as direct:
            expected = {i: Load.call(direct, "decode", i, 4) for i in range(len(E))}
        client = Client([r.address for r in replicas], timeout=30)
        load = Load(client, callers=32, kinds=("decode",), tokens=4)
        load.start()
        refused = []
        try:
            for drained in replicas[:-1]:
                live = [r for r in replicas if r.server.process.poll() is None]
                serve_more(live, 30, f"{len(live)} replicas serving")
                drained.server.process.send_signal(signal.SIGTERM)
                assert drained.server.process.wait(timeout=GRACE_PERIOD_S + 30) == 0
                refused.append(drained.refusals())
            serve_more(replicas[-1:], 30, "the last replica serving alone")
        finally:
            outcomes = load.stop()
            client.close()
        print(f"drains: {len(outcomes)} calls, refused by each draining replica: {refused}")
        failed = [o for o in outcomes if o.error is not None]
        assert not failed, (len(failed), Counter(o.error for o in failed))
        assert all(o.text == expected[o.index] for o in outcomes)
    finally:
        stop_all(replicas)


# ---- which Generate calls are retried -------------------------------------------------------


def test_a_seeded_generate_fails_over_an_unseeded_sample_does_not(
    tmp_path: Path, checkpoint: Path
) -> None:
    """Six long Generates at once over two replicas that each run one at a time, so that
    calls still run or wait on the victim when it is SIGKILLed: seeded ones all get their
    seed's text (from the survivor); unseeded samples that were on the victim fail
    UNAVAILABLE (a retry would answer a different sample than the one the caller may have
    been about to get, so the client does not retry them)."""
    replicas = start_replicas(tmp_path, checkpoint, 3, "--max-batch-size", "1")
    seeds = range(6)
    try:
        with Client(replicas[1].address, timeout=30) as direct:
            expected = [
                direct.generate(E[s], max_new_tokens=256, temperature=0.8, seed=s).text
                for s in seeds
            ]

        async def burst(pair: list[Replica], seeded: bool) -> list[Any]:
            async with AsyncClient([r.address for r in pair], timeout=60) as client:
                victim = pair[0]
                infos = victim.served(("GetModelInfo",))
                async with asyncio.timeout(POLL_S):  # both replicas connected and healthy
                    while await asyncio.to_thread(victim.served, ("GetModelInfo",)) == infos:
                        await client.model_info()
                calls = [
                    client.generate(
                        E[s], max_new_tokens=256, temperature=0.8, seed=s if seeded else None
                    )
                    for s in seeds
                ]
                tasks = [asyncio.ensure_future(call) for call in calls]
                async with asyncio.timeout(POLL_S):
                    while await asyncio.to_thread(victim.in_flight) < 2:
                        await asyncio.sleep(0.01)
                victim.server.process.send_signal(signal.SIGKILL)
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(burst([replicas[0], replicas[1]], seeded=True))
        assert [getattr(r, "text", r) for r in results] == expected

        results = asyncio.run(burst([replicas[2], replicas[1]], seeded=False))
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed, "a sample in flight on the killed replica should fail"
        assert all(isinstance(r, UnavailableError) for r in failed), failed
        assert all(isinstance(r.text, str) for r in results if r not in failed)
    finally:
        stop_all(replicas)
