"""Every RPC through a STOCK stub generated from decoder.proto at test time.

The generated modules are top-level `decoder_pb2` / `decoder_pb2_grpc`, independent of the
retd package. The same messages are also registered by the installed `retd.v1` package in
the default descriptor pool, so the calls run in a subprocess that never imports retd."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc_tools
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "protos" / "retd" / "v1"
CLIENT_SCRIPT = Path(__file__).with_name("_stock_client.py")


def embeddings(count: int) -> list[list[float]]:
    """Distinct embeddings that each decode to a different greedy byte."""
    return [np.random.default_rng(seed).standard_normal(768).tolist() for seed in range(count)]


@pytest.fixture(scope="module")
def stock(server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("stock_stub")
    include = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}",
            f"--python_out={tmp}", f"--grpc_python_out={tmp}", "decoder.proto",
        ],
        check=True, cwd=tmp,
    )  # fmt: skip
    assert (tmp / "decoder_pb2.py").exists() and (tmp / "decoder_pb2_grpc.py").exists()
    script = tmp / "stock_client.py"
    shutil.copyfile(CLIENT_SCRIPT, script)
    inputs = tmp / "inputs.json"
    inputs.write_text(json.dumps({"embeddings": embeddings(3)}))
    done = subprocess.run(
        [sys.executable, str(script), server.address, str(inputs)],
        capture_output=True, text=True, cwd=tmp, timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_stock_client_never_imported_retd(stock: dict[str, Any]) -> None:
    assert stock["imported_retd"] == []


def test_decode_vector_and_raw_forms_give_the_same_text(stock: dict[str, Any]) -> None:
    vector = stock["decode_vector"]
    assert vector["finish_reason"] == "FINISH_REASON_LENGTH"
    assert vector["usage"]["generated_tokens"] == 16
    assert len(vector["text"].encode()) >= 1
    assert vector["model"] == stock["list_models"]["default_model"]
    for form in ("decode_raw", "decode_raw_2d", "decode_raw_no_shape"):
        assert stock[form]["text"] == vector["text"], form
        assert stock[form]["finish_reason"] == vector["finish_reason"], form


def test_decode_timing_is_filled_in(stock: dict[str, Any]) -> None:
    timing = stock["decode_vector"]["timing"]
    assert timing["compute_ms"] > 0
    assert timing["total_ms"] >= timing["compute_ms"]
    assert timing["queue_ms"] >= 0


def test_decode_differs_between_embeddings(stock: dict[str, Any]) -> None:
    texts = [d["text"] for d in stock["decodes"]]
    assert len(set(texts)) == 3, texts


def test_generate_with_a_seed_is_reproducible(stock: dict[str, Any]) -> None:
    first, second = stock["generate_seeded"]
    assert first["text"] == second["text"]
    assert first["token_ids"] == second["token_ids"]
    assert int(first["seed"]) == int(second["seed"]) == 7
    other = stock["generate_other_seed"]
    assert int(other["seed"]) == 8
    assert other["token_ids"] != first["token_ids"]


def test_generate_response_fields(stock: dict[str, Any]) -> None:
    for response in [*stock["generate_seeded"], stock["generate_unseeded"]]:
        assert response["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS")
        assert 1 <= len(response["token_ids"]) <= 24
        if response["finish_reason"] == "FINISH_REASON_LENGTH":
            assert len(response["token_ids"]) == 24
        else:
            assert response["token_ids"][-1] == 0
        assert response["usage"]["generated_tokens"] == len(response["token_ids"])
        assert all(0 <= t < 256 for t in response["token_ids"])
        assert response["timing"]["compute_ms"] > 0
        assert response["timing"]["total_ms"] > 0
        assert response["mean_logprob"] <= 0
        assert response["model"] == stock["list_models"]["default_model"]


def test_generate_without_a_seed_returns_one_that_replays_it(stock: dict[str, Any]) -> None:
    unseeded, replayed = stock["generate_unseeded"], stock["generate_replayed"]
    assert int(replayed["seed"]) == int(unseeded["seed"])
    assert replayed["token_ids"] == unseeded["token_ids"]
    assert replayed["text"] == unseeded["text"]


def test_generate_at_temperature_zero_equals_decode(stock: dict[str, Any]) -> None:
    greedy, decoded = stock["generate_greedy"], stock["decode_24"]
    assert greedy["text"] == decoded["text"]
    assert greedy["finish_reason"] == decoded["finish_reason"]
    assert greedy["usage"] == decoded["usage"]


def test_generate_stream_joins_to_generate(stock: dict[str, Any]) -> None:
    chunks, whole = stock["generate_stream"], stock["generate_seeded"][0]
    assert len(chunks) >= 2
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [t for c in chunks for t in c["token_ids"]] == whole["token_ids"]
    assert [c["finish_reason"] for c in chunks[:-1]] == ["FINISH_REASON_UNSPECIFIED"] * (
        len(chunks) - 1
    )
    last = chunks[-1]
    assert last["finish_reason"] == whole["finish_reason"]
    assert last["usage"]["generated_tokens"] == len(whole["token_ids"])
    assert int(last["seed"]) == 7
    assert last["mean_logprob"] == pytest.approx(whole["mean_logprob"], abs=1e-5)
    assert last["timing"]["total_ms"] > 0
    assert last["model"] == whole["model"]


def test_decode_batch_keeps_order_and_matches_decode(stock: dict[str, Any]) -> None:
    results = stock["batch_ok"]["results"]
    assert [r["response"]["text"] for r in results] == [d["text"] for d in stock["decodes"]]
    assert all(r["response"]["usage"]["generated_tokens"] == 16 for r in results)


def test_decode_batch_bad_item_gets_its_own_error(stock: dict[str, Any]) -> None:
    first, middle, last = stock["batch"]["results"]
    assert first["response"]["text"] == stock["decodes"][0]["text"]
    assert last["response"]["text"] == stock["decodes"][2]["text"]
    assert "response" not in middle
    assert middle["error"]["code"] == 3
    assert middle["error"]["code_name"] == "INVALID_ARGUMENT"
    assert "embeddings[1]" in middle["error"]["message"]
    assert "768" in middle["error"]["message"]


def test_decode_stream_answers_every_id(stock: dict[str, Any]) -> None:
    answers = {a["id"]: a for a in stock["stream"]}
    assert len(stock["stream"]) == 4
    assert sorted(answers) == ["a", "b", "c", "d"]
    for item, index in (("a", 0), ("b", 1), ("d", 2)):
        assert answers[item]["response"]["text"] == stock["decodes"][index]["text"], item
        assert "error" not in answers[item]
    bad = answers["c"]
    assert "response" not in bad
    assert bad["error"]["code"] == 3
    assert "embedding" in bad["error"]["message"]
    assert "768" in bad["error"]["message"]


def test_list_models(stock: dict[str, Any]) -> None:
    listed = stock["list_models"]
    assert [m["name"] for m in listed["models"]] == [listed["default_model"]]
    model = listed["models"][0]
    assert int(model["parameter_count"]) == 722944
    assert model["embedding_dim"] == 768
    assert model["max_length"] == 256
    assert model["vocab_size"] == 256
    assert model["architecture"] == "ret_v21"
    assert model["trained"] is False
    assert len(model["checkpoint_sha256"]) == 64
    assert model["encoder"] == model["card"]["encoder"]["name"]


def test_get_model_info(stock: dict[str, Any]) -> None:
    listed = stock["list_models"]["models"][0]
    assert stock["info_default"] == listed
    assert stock["info_named"] == listed
    assert stock["info_unknown"]["code"] == "NOT_FOUND"
    assert "no-such-model" in stock["info_unknown"]["details"]
    assert listed["name"] in stock["info_unknown"]["details"]


def test_health_per_model(stock: dict[str, Any]) -> None:
    name = stock["list_models"]["default_model"]
    assert stock["health"] == {"": "SERVING", "retd.v1.Decoder": "SERVING", name: "SERVING"}
    assert stock["health_unknown"]["code"] == "NOT_FOUND"
