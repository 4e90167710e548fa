"""Real grpcurl against the daemon, from server reflection alone (no proto file given)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

GRPCURL = Path(sys.executable).parent / "grpcurl"
RPCS = ("Decode", "Generate", "GenerateStream", "DecodeBatch", "DecodeStream", "ListModels",
        "GetModelInfo")  # fmt: skip


def grpcurl(server: Any, *args: str, data: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [str(GRPCURL), "-plaintext", "-max-time", "30"]
    if data is not None:
        command += ["-d", "@"]
    command += [server.address, *args]
    return subprocess.run(command, input=data, capture_output=True, text=True, timeout=60)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_list_shows_every_service(server: Any) -> None:
    services = ok(grpcurl(server, "list")).split()
    assert "retd.v1.Decoder" in services
    assert "retd.v1.ModelRepository" in services
    assert "grpc.health.v1.Health" in services
    assert any(s.startswith("grpc.reflection.") for s in services)


def test_describe_decoder_shows_the_seven_rpcs(server: Any) -> None:
    described = ok(grpcurl(server, "describe", "retd.v1.Decoder"))
    rpcs = [line.split()[1] for line in described.splitlines() if line.strip().startswith("rpc ")]
    assert sorted(rpcs) == sorted(RPCS)
    assert "stream .retd.v1.DecodeStreamRequest" in described
    assert "returns ( stream .retd.v1.GenerateChunk )" in described


def test_describe_decode_request(server: Any) -> None:
    described = ok(grpcurl(server, "describe", "retd.v1.DecodeRequest"))
    assert "message DecodeRequest" in described
    for field in ("string model = 1;", ".retd.v1.Embedding embedding = 2;",
                  "uint32 max_new_tokens = 3;"):  # fmt: skip
        assert field in described


def test_decode_from_json(server: Any) -> None:
    values = np.random.default_rng(0).standard_normal(768).astype(np.float32).tolist()
    request = json.dumps({"embedding": {"vector": {"values": values}}, "max_new_tokens": 12})
    answer = json.loads(ok(grpcurl(server, "retd.v1.Decoder/Decode", data=request)))
    assert answer["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS")
    assert 1 <= answer["usage"]["generated_tokens"] <= 12
    assert isinstance(answer["text"], str)
    assert answer["timing"]["total_ms"] > 0
    again = json.loads(ok(grpcurl(server, "retd.v1.Decoder/Decode", data=request)))
    assert again["text"] == answer["text"]


def test_bad_call_prints_invalid_argument_and_fails(server: Any) -> None:
    request = json.dumps({"embedding": {"vector": {"values": [1.0, 2.0, 3.0]}}})
    done = grpcurl(server, "retd.v1.Decoder/Decode", data=request)
    assert done.returncode != 0
    assert "Code: InvalidArgument" in done.stderr
    assert "embedding: got 3 values" in done.stderr and "768" in done.stderr


def test_health_check(server: Any) -> None:
    assert json.loads(ok(grpcurl(server, "grpc.health.v1.Health/Check"))) == {"status": "SERVING"}
    name = json.loads(ok(grpcurl(server, "retd.v1.Decoder/ListModels")))["default_model"]
    request = json.dumps({"service": name})
    assert json.loads(ok(grpcurl(server, "grpc.health.v1.Health/Check", data=request))) == {
        "status": "SERVING"
    }


def test_list_models(server: Any) -> None:
    listed = json.loads(ok(grpcurl(server, "retd.v1.Decoder/ListModels")))
    assert [m["name"] for m in listed["models"]] == [listed["default_model"]]
    model = listed["models"][0]
    assert model["parameter_count"] == "722944"  # uint64 is a JSON string
    assert model["embedding_dim"] == 768
    assert model["card"]["encoder"]["dim"] == 768


def test_the_admin_service_lists_model_versions_from_reflection(server: Any) -> None:
    described = ok(grpcurl(server, "describe", "retd.v1.ModelRepository"))
    rpcs = [line.split()[1] for line in described.splitlines() if line.strip().startswith("rpc ")]
    assert sorted(rpcs) == ["List", "Load", "Unload"]
    listing = json.loads(ok(grpcurl(server, "retd.v1.ModelRepository/List", data="{}")))
    assert listing["models"] == [
        {
            "name": "ret_v21",
            "version": "1",
            "state": "MODEL_STATE_READY",
            "kind": "ret",
            "path": listing["models"][0]["path"],
            "serving": True,
        }
    ]
    assert listing["default_model"] == "ret_v21" and "repository" not in listing
    refused = grpcurl(server, "retd.v1.ModelRepository/Load", data="{}")
    assert refused.returncode != 0 and "model: empty; expected a model name" in refused.stderr
