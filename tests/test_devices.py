"""Devices and dtypes: CUDA when present (skipped cleanly without one), bf16 on the CPU,
and a clear refusal of fp16 on the CPU."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from retd.model.checkpoint import load_checkpoint
from retd.model.generation import SamplingParams, generate
from retd.v1 import decoder_pb2 as pb
from retd.v1 import decoder_pb2_grpc as pb_grpc
from tests.conftest import start_server

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
EMBEDDING = np.random.default_rng(5).standard_normal(768).astype(np.float32)


def _decode(address: str, max_new_tokens: int = 24) -> pb.DecodeResponse:
    with grpc.insecure_channel(address) as channel:
        request = pb.DecodeRequest(
            embedding=pb.Embedding(vector=pb.FloatVector(values=EMBEDDING.tolist())),
            max_new_tokens=max_new_tokens,
        )
        return pb_grpc.DecoderStub(channel).Decode(request, timeout=60)


def _info(address: str) -> pb.ModelInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.DecoderStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)


def test_bfloat16_on_cpu_serves_and_says_so(tmp_path: Path, checkpoint: Path) -> None:
    server = start_server(
        tmp_path, ["--checkpoint", str(checkpoint), "--device", "cpu", "--dtype", "bf16"]
    )
    try:
        info = _info(server.address)
        assert (info.dtype, info.device) == ("bfloat16", "cpu")
        loaded = load_checkpoint(checkpoint, dtype=torch.bfloat16)
        alone = generate(loaded.model, torch.from_numpy(EMBEDDING)[None], [SamplingParams(24)])
        assert _decode(server.address).text == alone[0].text
    finally:
        assert server.stop(signal.SIGTERM) == 0


def test_float16_on_cpu_is_refused_with_a_reason(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(RuntimeError) as raised:
        start_server(
            tmp_path, ["--checkpoint", str(checkpoint), "--device", "cpu", "--dtype", "fp16"]
        )
    assert "CUDA" in str(raised.value)


@needs_cuda
def test_cuda_greedy_matches_cpu(checkpoint: Path) -> None:
    embeddings = torch.from_numpy(np.random.default_rng(0).standard_normal((8, 768))).float()
    params = [SamplingParams(48)] * 8
    on_cpu = generate(load_checkpoint(checkpoint).model, embeddings, params)
    gpu_model = load_checkpoint(checkpoint, device="cuda").model
    on_gpu = generate(gpu_model, embeddings.cuda(), params)
    assert [r.token_ids for r in on_gpu] == [r.token_ids for r in on_cpu]


@needs_cuda
def test_training_on_cuda_falls_like_the_cpu_run_and_exports_to_the_cpu(tmp_path: Path) -> None:
    from retd.model.train import train
    from tests.model.test_training import fixture_config, losses

    on_cpu = fixture_config(tmp_path / "cpu", max_steps=20)
    on_gpu = fixture_config(tmp_path / "cuda", max_steps=20, device="cuda")
    train(on_cpu, progress=False)
    checkpoint = train(on_gpu, progress=False)
    a, b = losses(Path(on_cpu.out_dir)), losses(Path(on_gpu.out_dir))
    assert abs(a[0] - b[0]) < 1e-3 and np.mean(b[-5:]) < b[0] - 1.0, b
    assert abs(np.mean(a[-5:]) - np.mean(b[-5:])) < 0.1, (a[-5:], b[-5:])
    loaded = load_checkpoint(checkpoint, device="cpu")
    assert next(loaded.model.parameters()).device.type == "cpu"
    assert loaded.card["training"]["config"]["device"] == "cuda"


@needs_cuda
def test_server_on_cuda(tmp_path: Path, checkpoint: Path) -> None:
    server = start_server(tmp_path, ["--checkpoint", str(checkpoint), "--device", "cuda"])
    try:
        assert _info(server.address).device.startswith("cuda")
        assert _decode(server.address).usage.generated_tokens > 0
    finally:
        assert server.stop(signal.SIGTERM) == 0
