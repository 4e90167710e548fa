"""`--step-impl`: the C++ decode steps (SDPA and prefix attention) and the eager one serve the
same answers, in a thread engine and in an engine process; the log says which step a model
runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import start_server

EMBEDDINGS = np.random.default_rng(5).standard_normal((64, 768)).astype(np.float32)


def decode_all(tmp_path: Path, *args: str) -> tuple[list[tuple[str, int]], str]:
    """DecodeBatch of every embedding (Decode's default loop breakers on) on a daemon serving
    the shipped checkpoint with `args`: (text, finish reason) per item, and the daemon's log."""
    server = start_server(tmp_path, ["--torch-threads", "1", *args], plain_decode=False)
    try:
        with server.channel() as channel:
            batch = pb_grpc.DecoderStub(channel).DecodeBatch(
                pb.DecodeBatchRequest(
                    embeddings=[
                        pb.Embedding(raw=pb.RawTensor(data=e.astype("<f4").tobytes(), shape=[768]))
                        for e in EMBEDDINGS
                    ],
                    max_new_tokens=96,
                )
            )
    finally:
        assert server.stop() == 0, server.log()
    return [(r.response.text, r.response.finish_reason) for r in batch.results], server.log()


def test_the_cpp_step_serves_what_the_eager_step_serves(tmp_path: Path) -> None:
    eager, eager_log = decode_all(tmp_path, "--step-impl", "eager")
    cpp, cpp_log = decode_all(tmp_path, "--step-impl", "cpp", "--engine", "process")
    assert cpp == eager
    assert len({text for text, _ in eager}) > 20  # the embeddings were told apart
    assert "eager step" in eager_log and "C++ step" not in eager_log
    assert "C++ step" in cpp_log and "eager step" not in cpp_log


def test_the_prefix_step_serves_what_the_eager_step_serves(tmp_path: Path) -> None:
    """Not bitwise SDPA, but the same answers (measured: README); `auto` runs it."""
    eager, _ = decode_all(tmp_path, "--step-impl", "eager")
    prefix, prefix_log = decode_all(tmp_path)  # --step-impl auto
    assert prefix == eager
    assert "C++ prefix-attention step" in prefix_log and "eager step" not in prefix_log


def test_an_unknown_step_impl_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="step_impl: expected one of auto, cpp, prefix, eager"):
        start_server(tmp_path, ["--step-impl", "jit"])


def test_several_greedy_steps_a_call_serve_what_one_step_a_call_serves(tmp_path: Path) -> None:
    """`--steps-per-call`: an all-greedy batch's steps run in one C++ call, Decode's loop
    breakers read in C++; the same answers as deciding before every step."""
    one, _ = decode_all(tmp_path, "--steps-per-call", "1")
    many, _ = decode_all(tmp_path, "--steps-per-call", "8", "--engine", "process")
    assert many == one
    assert len({text for text, _ in one}) > 20
