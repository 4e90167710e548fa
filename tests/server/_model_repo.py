"""What the model repository tests share: the queries and what each version answers, a
repository on disk with versions that serve and versions that fail to load, and the calls
(Decode, the admin List, a health probe) they make to a daemon serving it."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retd.model.checkpoint import CARD_FILE, DEFAULT_CHECKPOINT, init_checkpoint, load_checkpoint
from retd.model.embed import load_split
from retd.model.generation import SamplingParams, generate
from retd.model.phrase_bank import save_phrase_bank
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from retd.v1 import repository_pb2 as admin_pb
from retd.v1 import repository_pb2_grpc as admin_grpc

SPLIT = load_split(Path(__file__).parents[1] / "data" / "embedded", "train")
QUERIES = SPLIT.embeddings[:6].astype(np.float32)  # real all-mpnet-base-v2 embeddings
MAX_NEW_TOKENS = 24
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def as_pb(values: np.ndarray) -> pb.Embedding:
    return pb.Embedding(raw=pb.RawTensor(data=values.astype("<f4").tobytes(), shape=[768]))


def greedy_texts(checkpoint: Path) -> list[str]:
    """What the model in `checkpoint` decodes for each query, computed here without a server."""
    loaded = load_checkpoint(checkpoint)
    params = [SamplingParams(MAX_NEW_TOKENS)] * len(QUERIES)
    results = generate(loaded.model, torch.from_numpy(QUERIES), params, tokenizer=loaded.tokenizer)
    return [r.text for r in results]


def publish(staging: Path, destination: Path) -> None:
    """Put a finished version directory in place at once (how a repository is updated)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(destination)


def rows(admin: admin_grpc.ModelRepositoryStub, model: str = "") -> dict[tuple[str, int], Any]:
    listing = admin.List(admin_pb.RepositoryListRequest(model=model), timeout=30)
    return {(m.name, m.version): m for m in listing.models}


#: Polls of the daemon's own reports (List, health) for a repository change: a load included.
POLL_S = 60.0


def health_of(channel: grpc.Channel, service: str) -> int:
    """The health a probe sees; SERVICE_UNKNOWN for a name the daemon never heard of."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@dataclass
class Repository:
    root: Path
    expected: dict[int, list[str]]  # version of "ret" -> its greedy texts for QUERIES


def make_repository(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    """The `repository` fixture of the tests: "ret" v1 (untrained) and v2 (the trained RET
    v2.1), "bank" v1 with its serving.toml, "fallback" whose newest version is broken, and
    four models whose only version fails to load, each in its own way."""
    root = tmp_path_factory.mktemp("model_repo")
    init_checkpoint(root / "ret" / "1", seed=11)
    shutil.copytree(DEFAULT_CHECKPOINT, root / "ret" / "2")  # the trained RET v2.1
    save_phrase_bank(root / "bank" / "1", SPLIT.texts[:64], SPLIT.embeddings[:64], name="bank")
    (root / "bank" / "serving.toml").write_text("max_batch_size = 4\nmax_queue_size = 100\n")
    # Three ways a version fails to load; each is reported and the others serve.
    (root / "unknown_kind" / "1").mkdir(parents=True)
    card = json.loads((root / "ret" / "1" / CARD_FILE).read_text())
    (root / "unknown_kind" / "1" / CARD_FILE).write_text(json.dumps({**card, "kind": "oracle"}))
    corrupt = shutil.copytree(root / "ret" / "1", root / "corrupt" / "1")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    # A broken newest version: the next newest serves instead.
    shutil.copytree(root / "ret" / "1", root / "fallback" / "1")
    shutil.copytree(corrupt, root / "fallback" / "2")
    mismatch = shutil.copytree(root / "ret" / "1", root / "mismatch" / "1")
    shutil.copytree(root / "ret" / "1", root / "bad_settings" / "1")
    (root / "bad_settings" / "serving.toml").write_text("max_batch_size = 0\n")
    card["config"]["n_layer"] += 1
    (mismatch / CARD_FILE).write_text(json.dumps(card))
    expected = {1: greedy_texts(root / "ret" / "1"), 2: greedy_texts(root / "ret" / "2")}
    assert expected[1] != expected[2], "the two versions must answer differently to tell apart"
    return Repository(root, expected)


def decode(stub: pb_grpc.DecoderStub, index: int, version: int = 0, model: str = "ret") -> Any:
    request = pb.DecodeRequest(
        model=model, version=version, embedding=as_pb(QUERIES[index]), max_new_tokens=MAX_NEW_TOKENS
    )
    return stub.Decode(request, timeout=60)
