"""A RET model and a phrase bank served side by side by the real daemon, one daemon for
every test of this package (fixtures of package scope), and the helpers those tests share."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

from retd.client import Client
from retd.model.checkpoint import init_checkpoint, load_checkpoint
from retd.model.embed import load_split
from retd.model.generation import SamplingParams, generate
from retd.model.phrase_bank import load_phrase_bank, save_phrase_bank
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import RunningServer, start_server

FIXTURE = Path(__file__).parents[2] / "data" / "embedded"
SPLIT = load_split(FIXTURE, "train")
TEXTS = SPLIT.texts  # 192 distinct texts
MEMBERS = SPLIT.embeddings.astype(np.float32)  # their all-mpnet-base-v2 embeddings
RET, BANK = "ret", "bank"
SERVER_CALLS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def as_pb(values: np.ndarray) -> pb.Embedding:
    return pb.Embedding(raw=pb.RawTensor(data=values.astype("<f4").tobytes(), shape=[768]))


def stranger(seed: int) -> np.ndarray:
    """A random direction: far from every phrase of the bank (cosine around 0)."""
    return np.random.default_rng(seed).standard_normal(768).astype(np.float32)


@pytest.fixture(scope="package")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("two_models")
    return {
        RET: init_checkpoint(folder / "ret_v21", seed=21),
        BANK: save_phrase_bank(folder / "bank", TEXTS, MEMBERS, name="fixture-bank"),
    }


@pytest.fixture(scope="package")
def served(checkpoints: dict[str, Path]) -> Iterator[RunningServer]:
    folder = checkpoints[RET].parent
    args = ["--model", f"{RET}={checkpoints[RET]}", "--model", f"{BANK}={checkpoints[BANK]}"]
    server = start_server(folder, [*args, "--max-batch-size", "16", "--access-log", "on"])
    yield server
    assert server.stop(signal.SIGTERM) == 0, server.log()


@pytest.fixture(scope="package")
def stub(served: RunningServer) -> Iterator[pb_grpc.DecoderStub]:
    with served.channel() as channel:
        yield pb_grpc.DecoderStub(channel)


@pytest.fixture(scope="package")
def client(served: RunningServer) -> Iterator[Client]:
    with Client(served.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="package")
def bank_matrix(checkpoints: dict[str, Path]) -> np.ndarray:
    """The bank's rows as the server holds them (float16 on disk, served as float32)."""
    return load_phrase_bank(checkpoints[BANK]).bank.embeddings.float().numpy()


@pytest.fixture(scope="package")
def ret_alone(checkpoints: dict[str, Path]) -> object:
    loaded = load_checkpoint(checkpoints[RET])

    def decode(values: np.ndarray, max_new_tokens: int) -> str:
        embedding = torch.from_numpy(values)[None]
        params = [SamplingParams(max_new_tokens)]
        return generate(loaded.model, embedding, params, tokenizer=loaded.tokenizer)[0].text

    return decode


def cosines(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    return matrix @ (query / np.linalg.norm(query))


def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()  # type: ignore[operator]
    return raised.value.code(), raised.value.details()
