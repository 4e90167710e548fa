"""The load generator of `retd bench`: N concurrent callers (asyncio coroutines on one
channel of the public `retd.client.AsyncClient`, so several replicas are balanced as the client
balances them) send requests for M requests or T seconds; the report gives requests/s,
generated tokens/s, latency percentiles, time to the first delta for streams, and errors by
status."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import numpy as np

from retd.client import AsyncClient
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc

from .report import (
    GENERATE_FIELDS,
    SHORT_TOKENS,
    BenchConfig,
    BenchReport,
    Sample,
    percentiles,
    token_range,
)


def _embeddings(count: int, dim: int, seed: int) -> list[pb.Embedding]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim)).astype("<f4")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [pb.Embedding(raw=pb.RawTensor(data=v.tobytes(), shape=[dim])) for v in vectors]


class LoadGenerator:
    def __init__(self, target: str | Sequence[str], config: BenchConfig) -> None:
        self.target = target
        self.config = config
        self._pool = _embeddings(256, config.embedding_dim, config.seed)
        self._rng = random.Random(config.seed)

    def _new_tokens(self) -> int:
        return self._rng.randint(self.config.min_new_tokens, self.config.max_new_tokens)

    def _embedding(self) -> pb.Embedding:
        return self._pool[self._rng.randrange(len(self._pool))]

    async def _one(self, stub: pb_grpc.DecoderStub, greedy: bool = False) -> Sample:
        """One request; greedy: a mixed load's Decode turn."""
        config, started = self.config, time.perf_counter()
        n = self._new_tokens()
        timeout = config.timeout
        if config.mode == "decode" or greedy:
            response = await stub.Decode(
                pb.DecodeRequest(model=config.model, embedding=self._embedding(), max_new_tokens=n),
                timeout=timeout,
            )
            return Sample(time.perf_counter() - started, response.usage.generated_tokens, n)
        if config.mode in ("generate", "generate_default", "generate_filtered", "mixed"):
            request = pb.GenerateRequest(
                model=config.model,
                embedding=self._embedding(),
                max_new_tokens=n,
                **GENERATE_FIELDS[config.mode],
            )
            response = await stub.Generate(request, timeout=timeout)
            return Sample(time.perf_counter() - started, response.usage.generated_tokens, n)
        if config.mode == "generate_stream":
            request = pb.GenerateRequest(
                model=config.model,
                embedding=self._embedding(),
                max_new_tokens=n,
                **GENERATE_FIELDS[config.mode],
            )
            first, tokens = None, 0
            async for chunk in stub.GenerateStream(request, timeout=timeout):
                if first is None:
                    first = time.perf_counter() - started
                if chunk.finish_reason:
                    tokens = chunk.usage.generated_tokens
            return Sample(time.perf_counter() - started, tokens, n, first_delta=first)
        if config.mode == "decode_batch":
            batch = pb.DecodeBatchRequest(
                model=config.model,
                embeddings=[self._embedding() for _ in range(config.batch_size)],
                max_new_tokens=n,
            )
            response = await stub.DecodeBatch(batch, timeout=timeout)
            failed = [r.error.code_name for r in response.results if r.HasField("error")]
            tokens = sum(r.response.usage.generated_tokens for r in response.results)
            return Sample(time.perf_counter() - started, tokens, n, failed[0] if failed else "OK")
        # decode_stream: one stream carrying batch_size items
        items = [
            pb.DecodeStreamRequest(
                id=str(i), model=config.model, embedding=self._embedding(), max_new_tokens=n
            )
            for i in range(config.batch_size)
        ]
        first, tokens, status = None, 0, "OK"
        async for answer in stub.DecodeStream(iter(items), timeout=timeout):
            if first is None:
                first = time.perf_counter() - started
            if answer.HasField("error"):
                status = answer.error.code_name
            tokens += answer.response.usage.generated_tokens
        return Sample(time.perf_counter() - started, tokens, n, status, first)

    async def run(self, server_pid: int | Sequence[int] | None = None) -> BenchReport:
        """Warm up, then measure; with `server_pid` (or several), the servers' RSS (summed)
        before and after."""
        config = self.config
        pids = [server_pid] if isinstance(server_pid, int) else list(server_pid or ())
        # The client's channel (its target resolution, balancing and gRPC retry policy), but
        # the calls go out as raw protobufs on a stub of it: what is timed is the server, not
        # the client's conversions or its own retries of Generate.
        options = [("grpc.max_receive_message_length", 64 << 20)]
        async with AsyncClient(self.target, options=options) as client:
            await asyncio.wait_for(client.channel.channel_ready(), timeout=30)
            stub = pb_grpc.DecoderStub(client.channel)

            def one(greedy: bool) -> Awaitable[Sample]:
                return self._one(stub, greedy)

            warm = []
            if config.warmup > 0:
                warm = await self._phase(one, requests=None, duration=config.warmup)
            rss_before = total_rss_mib(pids)
            started = time.perf_counter()
            samples = await self._phase(one, config.requests, config.duration)
            seconds = time.perf_counter() - started
        report = self._report(samples, seconds)
        report.extra["warmup_requests"] = len(warm)
        if pids:
            report.extra.update(
                server_rss_mib_before=rss_before, server_rss_mib_after=total_rss_mib(pids)
            )
        if len(pids) > 1:
            report.extra["replicas"] = len(pids)
        return report

    async def _phase(
        self, one: Callable[[bool], Awaitable[Sample]], requests: int | None, duration: float | None
    ) -> list[Sample]:
        """The callers, each calling `one(greedy)` in turn (greedy: a mixed load's Decode turn)
        for `requests` calls or `duration` seconds in all: the samples, failures by status."""
        samples: list[Sample] = []
        issued = 0
        end = None if duration is None else time.perf_counter() + duration

        def more() -> bool:
            nonlocal issued
            if requests is not None and issued >= requests:
                return False
            if end is not None and time.perf_counter() >= end:
                return False
            issued += 1
            return True

        async def caller(turn: int) -> None:
            while more():
                started = time.perf_counter()
                turn += 1  # a mixed load: Decode on every other request of each caller
                try:
                    samples.append(await one(mixed and turn % 2 == 0))
                except grpc.aio.AioRpcError as err:
                    samples.append(Sample(time.perf_counter() - started, 0, 0, err.code().name))

        mixed = self.config.mode == "mixed"
        await asyncio.gather(*(caller(i) for i in range(self.config.concurrency)))
        return samples

    def _report(self, samples: list[Sample], seconds: float) -> BenchReport:
        config = self.config
        ok = [s for s in samples if s.status == "OK"]
        per_request = config.batch_size if config.mode in ("decode_batch", "decode_stream") else 1
        errors = Counter(s.status for s in samples if s.status != "OK")
        return BenchReport(
            mode=config.mode,
            concurrency=config.concurrency,
            batch_size=per_request,
            new_tokens=token_range(config),
            seconds=seconds,
            requests=len(samples),
            sequences=len(ok) * per_request,
            requests_per_s=len(ok) / seconds,
            sequences_per_s=len(ok) * per_request / seconds,
            tokens_per_s=sum(s.tokens for s in ok) / seconds,
            latency_ms=percentiles([s.latency for s in ok]),
            short_latency_ms=percentiles(
                [s.latency for s in ok if s.max_new_tokens <= SHORT_TOKENS]
            )
            if config.min_new_tokens <= SHORT_TOKENS < config.max_new_tokens
            else {},
            first_delta_ms=percentiles([s.first_delta for s in ok if s.first_delta is not None]),
            errors=dict(errors),
        )


def rss_mib(pid: int | None) -> float | None:
    """Resident memory of a process in MiB (Linux), or None."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux: the parent ids in /proc/*/stat), `pid` first; empty if
    it has ended."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # ended while we read
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    if not Path(f"/proc/{pid}").exists():
        return []
    tree, index = [pid], 0
    while index < len(tree):
        tree.extend(children.get(tree[index], ()))
        index += 1
    return tree


def tree_rss_mib(pid: int) -> float | None:
    """The summed resident memory of `pid` and its descendants in MiB (shared pages count in
    each process, as VmRSS counts them), or None if `pid` has ended."""
    values = [rss_mib(p) for p in process_tree(pid)]
    if not values or values[0] is None:
        return None
    return sum(v for v in values if v is not None)  # a child that ended meanwhile: nothing


def total_rss_mib(pids: Sequence[int]) -> float | None:
    """The summed resident memory of processes in MiB, or None if one cannot be read."""
    values = [rss_mib(pid) for pid in pids]
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)
