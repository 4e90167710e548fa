"""Speculation on n-gram drafts through the real daemon (it is on by default): the shipped
checkpoint's plain greedy answers, batched together, are `generate()`'s alone to the token,
with drafts (the default) and with `--draft-tokens 0` (both the step `--step-impl auto` picks,
as `generate()` is given it here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retd.model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from retd.model.cpp_step import step_function
from retd.model.generation import SamplingParams, generate
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import start_server

ROWS, MAX_NEW = 24, 96  # the shipped checkpoint loops on some random embeddings


def vectors() -> np.ndarray:
    rows = np.random.default_rng(5).standard_normal((ROWS, 768)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("flags", [[], ["--draft-tokens", "0"]], ids=["drafts", "no drafts"])
def test_plain_greedy_answers_are_generates_alone(tmp_path: Path, flags: list[str]) -> None:
    loaded = load_checkpoint(DEFAULT_CHECKPOINT)
    step = step_function(loaded.model, "auto")
    greedy = [SamplingParams(max_new_tokens=MAX_NEW)]
    expected = [
        generate(loaded.model, torch.from_numpy(v)[None], greedy, tokenizer=loaded.tokenizer,
                 step=step)[0]
        for v in vectors()
    ]  # fmt: skip
    server = start_server(tmp_path, ["--checkpoint", str(DEFAULT_CHECKPOINT), *flags])
    try:
        with server.channel() as channel:
            batch = pb_grpc.DecoderStub(channel).DecodeBatch(
                pb.DecodeBatchRequest(
                    embeddings=[pb.Embedding(vector=pb.FloatVector(values=v.tolist()))
                                for v in vectors()],
                    max_new_tokens=MAX_NEW,
                ),
                timeout=120,
            )  # fmt: skip
    finally:
        assert server.stop() == 0, server.log()
    assert len(batch.results) == ROWS
    for item, alone in zip(batch.results, expected, strict=True):
        assert item.WhichOneof("outcome") == "response", item
        assert item.response.text == alone.text
        assert item.response.usage.generated_tokens == len(alone.token_ids)
    assert any(len(alone.token_ids) == MAX_NEW for alone in expected)  # some rows loop
