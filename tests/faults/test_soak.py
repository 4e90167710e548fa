"""A mixed-load soak against a real daemon: N callers for T seconds mixing Decode, seeded
Generate, GenerateStream (some cancelled mid-way on purpose), DecodeBatch, DecodeStream and
bad requests. Fails when an accepted call is lost or wrong, or when the daemon's RSS after
the run is more than 10% above its RSS after a warm-up phase of the same mix.

RETD_SOAK_CALLERS (default 16) and RETD_SOAK_SECONDS (default 30; `make soak`: 600) size it;
it prints one summary line (calls by kind and status, RSS before and after)."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest

from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import RunningServer
from tests.faults.conftest import (
    EMBEDDING_COUNT,
    Reference,
    assert_serving_correctly,
    embedding,
    rss_kib,
    wait_idle,
)

CALLERS = int(os.environ.get("RETD_SOAK_CALLERS", "16"))
SECONDS = float(os.environ.get("RETD_SOAK_SECONDS", "30"))
WARM_UP_SECONDS = min(10.0, max(3.0, SECONDS / 4))
RSS_GROWTH_LIMIT = 0.10
CALL_TIMEOUT_S = 60.0
DECODE_LENGTHS = (8, 16, 32)
SEEDS = (1, 2, 3, 4)
SAMPLED_TOKENS = 32
BATCH_TOKENS = 16
OK = grpc.StatusCode.OK
KINDS = (
    ("Decode", 4),
    ("Generate", 3),
    ("GenerateStream", 2),
    ("GenerateStream-cancel", 1),
    ("DecodeBatch", 2),
    ("DecodeStream", 2),
    ("bad", 2),
)


def bad_requests() -> list[tuple[str, Callable[[pb_grpc.DecoderStub], object]]]:
    short = pb.Embedding(vector=pb.FloatVector(values=[0.5] * 5))
    nan = pb.Embedding(vector=pb.FloatVector(values=[float("nan")] * 768))
    e = embedding(0)
    t = CALL_TIMEOUT_S
    return [
        ("short embedding", lambda s: s.Decode(pb.DecodeRequest(embedding=short), timeout=t)),
        ("nan embedding", lambda s: s.Decode(pb.DecodeRequest(embedding=nan), timeout=t)),
        ("no embedding", lambda s: s.Generate(pb.GenerateRequest(), timeout=t)),
        (
            "top_p 0",
            lambda s: s.Generate(pb.GenerateRequest(embedding=e, top_p=0.0), timeout=t),
        ),
        (
            "empty stop",
            lambda s: list(s.GenerateStream(pb.GenerateRequest(embedding=e, stop=[""]), timeout=t)),
        ),
        (
            "too many tokens",
            lambda s: s.Decode(pb.DecodeRequest(embedding=e, max_new_tokens=257), timeout=t),
        ),
        ("empty batch", lambda s: s.DecodeBatch(pb.DecodeBatchRequest(), timeout=t)),
    ]


@dataclass
class Tally:
    """What a phase's calls came to; shared by its callers under `lock`."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seeded: dict[tuple[int, int], str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, kind: str, code: grpc.StatusCode) -> None:
        with self.lock:
            self.counts[f"{kind} {code.name}"] += 1

    def fail(self, message: str) -> None:
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(message)

    def same_as_first(self, key: tuple[int, int], text: str, kind: str) -> None:
        """Seeded sampling is reproducible: every answer for a key equals the first one."""
        with self.lock:
            first = self.seeded.setdefault(key, text)
        if text != first:
            self.fail(f"{kind} {key}: {text!r} differs from the first answer {first!r}")


class Caller:
    def __init__(
        self,
        number: int,
        stub: pb_grpc.DecoderStub,
        tally: Tally,
        expected: Callable[[int, int], str],
    ) -> None:
        self.rng = random.Random(number)
        self.stub = stub
        self.tally = tally
        self.expected = expected
        self.bad = bad_requests()

    def run(self, until: float) -> None:
        kinds, weights = zip(*KINDS, strict=True)
        while time.monotonic() < until:
            kind = self.rng.choices(kinds, weights)[0]
            try:
                getattr(self, "call_" + kind.replace("-", "_"))()
            except grpc.RpcError as error:  # lost: any status other than the expected one
                self.tally.count(kind, error.code())
                self.tally.fail(f"{kind}: {error.code().name} {error.details()}")
            except Exception as error:
                self.tally.fail(f"{kind}: {error!r}")
                raise

    def _check(self, kind: str, what: object, text: str, expected: str) -> None:
        if text != expected:
            self.tally.fail(f"{kind} {what}: got {text!r}, expected {expected!r}")

    def call_Decode(self) -> None:
        index = self.rng.randrange(EMBEDDING_COUNT)
        length = self.rng.choice(DECODE_LENGTHS)
        request = pb.DecodeRequest(embedding=embedding(index), max_new_tokens=length)
        response = self.stub.Decode(request, timeout=CALL_TIMEOUT_S)
        self.tally.count("Decode", OK)
        self._check("Decode", (index, length), response.text, self.expected(index, length))

    def _sampled(self) -> tuple[tuple[int, int], pb.GenerateRequest]:
        key = (self.rng.randrange(EMBEDDING_COUNT), self.rng.choice(SEEDS))
        request = pb.GenerateRequest(
            embedding=embedding(key[0]),
            max_new_tokens=SAMPLED_TOKENS,
            temperature=0.9,
            top_k=50,
            top_p=0.95,
            seed=key[1],
        )
        return key, request

    def call_Generate(self) -> None:
        key, request = self._sampled()
        response = self.stub.Generate(request, timeout=CALL_TIMEOUT_S)
        self.tally.count("Generate", OK)
        if response.seed != key[1]:
            self.tally.fail(f"Generate {key}: seed {response.seed} came back")
        self.tally.same_as_first(key, response.text, "Generate")

    def call_GenerateStream(self) -> None:
        key, request = self._sampled()
        chunks = list(self.stub.GenerateStream(request, timeout=CALL_TIMEOUT_S))
        self.tally.count("GenerateStream", OK)
        if not chunks or chunks[-1].finish_reason == pb.FINISH_REASON_UNSPECIFIED:
            self.tally.fail(f"GenerateStream {key}: no final chunk")
        self.tally.same_as_first(key, "".join(c.text for c in chunks), "GenerateStream")

    def call_GenerateStream_cancel(self) -> None:
        _, request = self._sampled()
        call = self.stub.GenerateStream(request, timeout=CALL_TIMEOUT_S)
        next(call)
        call.cancel()  # on purpose, mid-way
        try:
            for _ in call:
                pass
        except grpc.RpcError as error:
            self.tally.count("GenerateStream-cancel", error.code())
            if error.code() != grpc.StatusCode.CANCELLED:
                self.tally.fail(f"cancelled stream ended {error.code().name}")
            return
        self.tally.count("GenerateStream-cancel", OK)  # it had finished already

    def call_DecodeBatch(self) -> None:
        indices = [self.rng.randrange(EMBEDDING_COUNT) for _ in range(self.rng.randint(1, 4))]
        request = pb.DecodeBatchRequest(
            embeddings=[embedding(i) for i in indices], max_new_tokens=BATCH_TOKENS
        )
        response = self.stub.DecodeBatch(request, timeout=CALL_TIMEOUT_S)
        self.tally.count("DecodeBatch", OK)
        texts = [r.response.text if r.HasField("response") else r.error for r in response.results]
        expected = [self.expected(i, BATCH_TOKENS) for i in indices]
        self._check("DecodeBatch", indices, repr(texts), repr(expected))

    def call_DecodeStream(self) -> None:
        indices = [self.rng.randrange(EMBEDDING_COUNT) for _ in range(self.rng.randint(1, 4))]
        items = [
            pb.DecodeStreamRequest(id=f"{n}", embedding=embedding(i), max_new_tokens=BATCH_TOKENS)
            for n, i in enumerate(indices)
        ]
        answers = list(self.stub.DecodeStream(iter(items), timeout=CALL_TIMEOUT_S))
        self.tally.count("DecodeStream", OK)
        got = {a.id: a.response.text if a.HasField("response") else a.error for a in answers}
        expected = {f"{n}": self.expected(i, BATCH_TOKENS) for n, i in enumerate(indices)}
        self._check(
            "DecodeStream", indices, repr(sorted(got.items())), repr(sorted(expected.items()))
        )

    def call_bad(self) -> None:
        name, send = self.rng.choice(self.bad)
        try:
            send(self.stub)
        except grpc.RpcError as error:
            self.tally.count("bad", error.code())
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                self.tally.fail(f"bad request {name!r}: {error.code().name} {error.details()}")
            return
        self.tally.count("bad", OK)
        self.tally.fail(f"bad request {name!r} was answered OK")


def run_phase(server: RunningServer, seconds: float, expected: Callable[[int, int], str]) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    with server.channel() as channel:
        stub = pb_grpc.DecoderStub(channel)
        callers = [Caller(n, stub, tally, expected) for n in range(CALLERS)]
        threads = [threading.Thread(target=c.run, args=(until,), daemon=True) for c in callers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=seconds + 2 * CALL_TIMEOUT_S)
        assert not any(t.is_alive() for t in threads), "a soak caller did not finish"
    return tally


def by_kind(counts: Counter[str]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counts.items()))


@pytest.mark.slow
def test_soak_mixed_load(
    daemon: RunningServer, reference: Reference, capsys: pytest.CaptureFixture[str]
) -> None:
    table = {
        (i, n): reference(i, n)
        for i in range(EMBEDDING_COUNT)
        for n in (*DECODE_LENGTHS, BATCH_TOKENS)
    }

    def expected(index: int, length: int) -> str:
        return table[(index, length)]

    with capsys.disabled():  # a long quiet test: say what it is doing, so nobody thinks it hung
        print(
            f"\nsoak: {CALLERS} callers, a {WARM_UP_SECONDS:g}s warm-up then {SECONDS:g}s "
            "of mixed load (RETD_SOAK_SECONDS sizes it) ...",
            end="",
            flush=True,
        )
    warm_up = run_phase(daemon, WARM_UP_SECONDS, expected)
    assert not warm_up.failures, warm_up.failures
    wait_idle(daemon.address)
    rss_before = rss_kib(daemon.process.pid)

    soak = run_phase(daemon, SECONDS, expected)
    wait_idle(daemon.address)
    rss_after = rss_kib(daemon.process.pid)
    growth = rss_after / rss_before - 1
    with capsys.disabled():
        print(
            f"\nsoak done: {CALLERS} callers, {SECONDS:g}s (after a {WARM_UP_SECONDS:g}s warm-up): "
            f"{sum(soak.counts.values())} calls: {by_kind(soak.counts)}; "
            f"RSS {rss_before / 1024:.1f} MiB -> {rss_after / 1024:.1f} MiB ({growth:+.1%}); "
            f"{len(soak.failures)} failures"
        )
    assert not soak.failures, soak.failures
    for kind, _ in KINDS:  # the mix really ran
        assert any(key.startswith(kind + " ") for key in soak.counts), (kind, soak.counts)
    assert growth <= RSS_GROWTH_LIMIT, f"RSS grew {growth:.1%} over the soak"
    assert_serving_correctly(daemon, reference)
