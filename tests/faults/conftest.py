"""Shared pieces of the fault tests: distinct embeddings, reference texts from
`generate()` run alone on the same checkpoint, bounded polls of a daemon's load, and its RSS."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests._wait import poll
from tests.conftest import RunningServer, start_server

POLL_LIMIT_S = 20.0
EMBEDDING_COUNT = 8


def embedding_values(index: int) -> list[float]:
    """The index-th test embedding: 768 float32-exact values."""
    values = np.random.default_rng(1000 + index).standard_normal(768).astype(np.float32)
    return [float(v) for v in values]


def embedding(index: int) -> pb.Embedding:
    return pb.Embedding(vector=pb.FloatVector(values=embedding_values(index)))


Reference = Callable[[int, int], str]
Greedy = Callable[[list[float], int], str]


@pytest.fixture(scope="session")
def greedy(checkpoint: Path) -> Greedy:
    """greedy(values, max_new_tokens): the text of greedy `generate()` run alone, in this
    process, on the checkpoint the daemons serve (memoised)."""
    import torch

    from retd.model.checkpoint import load_checkpoint
    from retd.model.generation import SamplingParams, generate

    loaded = load_checkpoint(checkpoint)
    cache: dict[tuple[bytes, int], str] = {}

    def text(values: list[float], max_new_tokens: int) -> str:
        tensor = torch.tensor([values], dtype=torch.float32)
        key = (tensor.numpy().tobytes(), max_new_tokens)
        if key not in cache:
            params = [SamplingParams(max_new_tokens=max_new_tokens)]
            cache[key] = generate(loaded.model, tensor, params)[0].text
        return cache[key]

    return text


@pytest.fixture(scope="session")
def reference(greedy: Greedy) -> Reference:
    """reference(index, max_new_tokens): greedy `generate()` alone for the index-th embedding."""
    return lambda index, max_new_tokens: greedy(embedding_values(index), max_new_tokens)


def load(address: str) -> pb.ModelLoad:
    with grpc.insecure_channel(address) as channel:
        info = pb_grpc.DecoderStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    return info.load


def wait_idle(address: str, limit_s: float = POLL_LIMIT_S) -> pb.ModelLoad:
    """Bounded poll of GetModelInfo until nothing waits or runs; fails after `limit_s`."""
    last = [load(address)]

    def idle() -> bool:
        last[0] = load(address)
        return not (last[0].waiting or last[0].running)

    poll(
        idle,
        limit_s,
        lambda: f"load back to 0 (waiting {last[0].waiting}, running {last[0].running})",
        interval=0.02,
    )
    return last[0]


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def decode(address: str, index: int, max_new_tokens: int) -> str:
    with grpc.insecure_channel(address) as channel:
        request = pb.DecodeRequest(embedding=embedding(index), max_new_tokens=max_new_tokens)
        return pb_grpc.DecoderStub(channel).Decode(request, timeout=30).text


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[RunningServer]:
    """A daemon of this module's own (the faults it takes do not reach other modules)."""
    running = start_server(tmp_path_factory.mktemp("daemon"), ["--checkpoint", str(checkpoint)])
    yield running
    alive = running.process.poll() is None
    code = running.stop()
    assert alive and code == 0, running.log()[-5000:]


def assert_serving_correctly(server: RunningServer, reference: Reference) -> None:
    """The daemon is alive, idle, and its Decode equals `generate()` alone."""
    assert server.process.poll() is None, server.log()[-5000:]
    wait_idle(server.address)
    for index in (0, 3):
        assert decode(server.address, index, 48) == reference(index, 48)
