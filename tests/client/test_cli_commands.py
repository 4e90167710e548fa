"""The `retd` command line end to end: every client command against the real daemon
(`server`), its output and exit status, and the console script."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from retd.client import Client, _cli_commands, cli
from tests.client.conftest import DIM, MODEL, FakeStdin, embeddings, npy_bytes

B = embeddings(3, seed=9)  # distinct greedy texts


# --- end to end against the real server ----------------------------------------------------


def run(argv, capsys, monkeypatch, stdin: bytes = b""):
    """`retd ARGV` in-process; stdout goes to `out=`, errors to (captured) stderr."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(FakeStdin(stdin)))
    out = io.StringIO()
    code = cli.main(argv, out=out)
    return code, out.getvalue(), capsys.readouterr().err


@pytest.fixture
def target(server) -> str:
    return server.address


@pytest.fixture
def client(target):
    with Client(target, timeout=30) as c:
        yield c


def test_decode_command(target, client, capsys, monkeypatch):
    text = client.decode(B[0], max_new_tokens=8).text
    argv = ["decode", json.dumps(B[0].tolist()), "--target", target, "--max-new-tokens", "8"]
    assert run(argv, capsys, monkeypatch) == (0, text + "\n", "")
    code, out, err = run(
        ["decode", "--target", target, "--json", "--max-new-tokens", "8", "--priority", "2"],
        capsys,
        monkeypatch,
        npy_bytes(B[0]),
    )
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert result["text"] == text and result["model"] == MODEL
    assert result["finish_reason"] == "length" and result["usage"] == {"generated_tokens": 8}
    assert set(result["timing"]) == {"queue_ms", "compute_ms", "total_ms"}


def test_decode_text_embeds_with_the_encoder_then_decodes(target, client, capsys, monkeypatch):
    from retd.model.encoder import SentenceEncoder

    sentences = ["A small dog barked at the mailman.", "The stock market fell sharply."]
    vectors = SentenceEncoder.load().encode(sentences)
    expected = [client.decode(v, max_new_tokens=12).text for v in vectors]
    argv = ["decode", "--target", target, "--max-new-tokens", "12", "--json"]
    code, out, err = run([*argv, "--text", sentences[0]], capsys, monkeypatch)
    assert (code, err, json.loads(out)["text"]) == (0, "", expected[0])
    code, out, err = run(
        [*argv, "--text", sentences[0], "--text", sentences[1]], capsys, monkeypatch
    )
    assert code == 0 and [json.loads(line)["result"]["text"] for line in out.splitlines()] == (
        expected
    )
    code, _, err = run([*argv, "[1, 2]", "--text", sentences[0]], capsys, monkeypatch)
    assert code == 2 and "either EMBEDDING or --text" in err


def test_decode_batch_command(target, client, capsys, monkeypatch, tmp_path):
    texts = [client.decode(e, max_new_tokens=8).text for e in B]
    path = tmp_path / "b.npy"
    np.save(path, B)
    argv = ["decode", str(path), "--target", target, "--max-new-tokens", "8"]
    code, out, _ = run(argv, capsys, monkeypatch)
    assert (code, out.splitlines()) == (0, texts)
    code, out, _ = run([*argv, "--json"], capsys, monkeypatch)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["result"]["text"] for line in lines] == texts
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert all(line["error"] is None for line in lines)


def test_ragged_json_batch_is_an_input_error(target, capsys, monkeypatch):
    batch = json.dumps([[1.0] * DIM, [1.0] * 3])
    code, out, err = run(["decode", "--target", target], capsys, monkeypatch, batch.encode())
    assert code == 2 and out == "" and "rectangular" in err


def test_batch_output_keeps_one_line_per_item(capsys):
    from retd.client import DecodeBatchItem, DecodeResult, FinishReason, Timing, Usage
    from retd.client.errors import InvalidArgumentError

    ok = DecodeResult("two\nlines", FinishReason.EOS, Usage(1), Timing(0, 0, 0), "m")
    items = [
        DecodeBatchItem(result=ok),
        DecodeBatchItem(error=InvalidArgumentError("embeddings[1]: bad")),
    ]
    assert _cli_commands._print_batch(items, sys.stdout, as_json=False) == 2
    captured = capsys.readouterr()
    assert captured.out == "two\\nlines\n\n"
    assert captured.err == "error: item 1: INVALID_ARGUMENT: embeddings[1]: bad\n"
    assert _cli_commands._print_batch(items, sys.stdout, as_json=True) == 2
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["result"]["text"] == "two\nlines" and lines[0]["error"] is None
    assert lines[1] == {
        "index": 1,
        "result": None,
        "error": {"code": "INVALID_ARGUMENT", "details": "embeddings[1]: bad"},
    }


def test_rpc_errors_print_code_and_field(target, capsys, monkeypatch):
    code, out, err = run(["decode", "[1, 2]", "--target", target], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.startswith("error: INVALID_ARGUMENT: embedding: got 2 values; expected 768")
    e = json.dumps(B[0].tolist())
    code, _, err = run(["decode", e, "--target", target, "--model", "nope"], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: NOT_FOUND: model: 'nope' is not loaded")
    # A deadline that passes before any answer can come, whatever the sampled text's length
    # (a sampled byte 0 can end a generation at once).
    argv = ["generate", e, "--target", target, "--max-new-tokens", "256", "--timeout", "1e-6"]
    code, _, err = run(argv, capsys, monkeypatch)
    assert code == 2 and err.startswith("error: DEADLINE_EXCEEDED")
    argv = ["generate", e, "--target", target, "--top-p", "0"]
    code, _, err = run(argv, capsys, monkeypatch)
    assert code == 2 and err.startswith("error: INVALID_ARGUMENT: top_p")


def test_generate_command(target, client, capsys, monkeypatch):
    e = json.dumps(B[1].tolist())
    common = ["--target", target, "--max-new-tokens", "12", "--seed", "5"]
    expected = client.generate(B[1], max_new_tokens=12, seed=5)
    code, out, _ = run(["generate", e, *common, "--json"], capsys, monkeypatch)
    result = json.loads(out)
    assert code == 0 and result["seed"] == 5 and result["text"] == expected.text
    assert result["token_ids"] == expected.token_ids and result["model"] == MODEL
    assert run(["generate", e, *common], capsys, monkeypatch) == (0, expected.text + "\n", "")
    streamed = run(["generate", e, *common, "--stream", "--priority", "1"], capsys, monkeypatch)
    assert streamed == (0, expected.text + "\n", "")
    code, out, _ = run(["generate", e, *common, "--stream", "--json"], capsys, monkeypatch)
    chunks = [json.loads(line) for line in out.splitlines()]
    assert "".join(c["text"] for c in chunks) == expected.text
    assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[-1]["usage"] == {"generated_tokens": 12} and chunks[-1]["seed"] == 5
    code, out, _ = run(["generate", e, *common, "--temperature", "0"], capsys, monkeypatch)
    plain = dict(no_repeat_ngram_size=0, repetition_penalty=1)  # Decode's loop breakers off
    assert out == client.decode(B[1], max_new_tokens=12, **plain).text + "\n"


def test_generate_stop_option(target, client, capsys, monkeypatch):
    from tests.client.conftest import stop_case

    base, stop, _, seed = stop_case(client, B[1], 12)
    argv = ["generate", json.dumps(B[1].tolist()), "--target", target, "--max-new-tokens", "12"]
    argv += ["--seed", str(seed), "--stop", "\x01never", "--stop", stop, "--json"]
    code, out, _ = run(argv, capsys, monkeypatch)
    result = json.loads(out)
    assert code == 0 and result["finish_reason"] == "stop"
    assert result["text"] == base.text[: base.text.index(stop)]


def test_generate_refuses_a_batch(target, capsys, monkeypatch):
    code, _, err = run(["generate", "[[1], [2]]", "--target", target], capsys, monkeypatch)
    assert code == 2 and "retd decode" in err


def test_info_command(target, client, capsys, monkeypatch):
    info = client.model_info()
    code, out, _ = run(["info", "--target", target], capsys, monkeypatch)
    head, card = out.split("\ncard:\n", 1)
    lines = dict(line.split(": ", 1) for line in head.splitlines())
    # The card: indented JSON, whole numbers as integers (a protobuf Struct has floats only).
    assert card.startswith("  {\n    ") and card.endswith("  }\n")
    shown = json.loads(card)
    n_head = shown["config"]["n_head"]
    assert shown == info.card and isinstance(n_head, int) and f'"n_head": {n_head},' in card
    assert ".0," not in card and ".0\n" not in card
    assert code == 0 and lines["name"] == MODEL
    assert lines["parameter_count"] == "722944" and lines["embedding_dim"] == "768"
    assert lines["trained"] == "False" and lines["checkpoint_sha256"] == info.checkpoint_sha256
    load = json.loads(lines["load"])
    assert (load["max_batch_size"], load["max_queue_size"]) == (32, 1024)
    assert load["batching"] == "continuous"
    code, out, _ = run(
        ["info", "--target", target, "--json", "--model", MODEL], capsys, monkeypatch
    )
    result = json.loads(out)
    assert code == 0 and result["card"]["encoder"]["name"] == info.encoder
    assert result["parameter_count"] == 722944 and result["trained"] is False
    assert set(result["load"]) == {
        "waiting",
        "max_queue_size",
        "running",
        "max_batch_size",
        "batching",
        "max_wait_ms",
    }
    code, _, err = run(["info", "--target", target, "--model", "nope"], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: NOT_FOUND")


def test_models_command(target, capsys, monkeypatch):
    code, out, _ = run(["models", "--target", target], capsys, monkeypatch)
    assert (code, out) == (0, f"* {MODEL}\t2.1.0-untrained\tret_v21\tcpu\tfloat32\n")
    code, out, _ = run(["models", "--target", target, "--json"], capsys, monkeypatch)
    listed = json.loads(out)
    assert listed["default_model"] == MODEL
    assert [m["name"] for m in listed["models"]] == [MODEL]
    assert listed["models"][0]["load"]["max_batch_size"] == 32


def test_health_command(target, capsys, monkeypatch):
    assert run(["health", "--target", target], capsys, monkeypatch) == (0, "SERVING\n", "")
    argv = ["health", "--target", target, "--service", "retd.v1.Decoder"]
    assert run(argv, capsys, monkeypatch)[:2] == (0, "SERVING\n")
    argv = ["health", "--target", target, "--service", MODEL]
    assert run(argv, capsys, monkeypatch)[:2] == (0, "SERVING\n")
    code, _, err = run(["health", "--target", target, "--service", "x"], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: NOT_FOUND")


def test_target_from_environment(target, capsys, monkeypatch):
    monkeypatch.setenv("RETD_TARGET", target)
    assert run(["health"], capsys, monkeypatch)[:2] == (0, "SERVING\n")


def test_unreachable_server_exit_code(capsys, monkeypatch):
    code, _, err = run(["health", "--target", "127.0.0.1:1", "--timeout", "5"], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: UNAVAILABLE")


def test_console_script_end_to_end(target, client, tmp_path):
    """`retd` in a subprocess, as a user runs it: .npy file in, text out."""
    path = tmp_path / "e.npy"
    np.save(path, B[2])
    command = [sys.executable, "-m", "retd.client.cli"]
    done = subprocess.run(
        [*command, "decode", str(path), "--target", target, "--max-new-tokens", "8"],
        capture_output=True,
        encoding="utf-8",
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == client.decode(B[2], max_new_tokens=8).text + "\n"
    script = shutil.which("retd", path=os.path.dirname(sys.executable))  # the console script
    done = subprocess.run(
        [script, "health"] if script else [*command, "health"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RETD_TARGET": target},
    )
    assert (done.returncode, done.stdout) == (0, "SERVING\n")


def test_console_script_help():
    done = subprocess.run(
        [sys.executable, "-m", "retd.client.cli", "decode", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "EMBEDDING" in done.stdout and "--priority" in done.stdout
