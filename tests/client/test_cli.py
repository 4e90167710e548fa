"""The `retd` command line: parsing, embedding input, and output against a fake server."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from fake_decoder import DIM
from retd.client import DEFAULT_TARGET, cli
from retd.client.inputs import EmbeddingInputError, parse_embeddings, read_embeddings

E = np.arange(DIM, dtype=np.float32)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class FakeStdin(io.BytesIO):
    def __init__(self, data: bytes, tty: bool = False) -> None:
        super().__init__(data)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


# --- input ---------------------------------------------------------------------------------


def test_read_npy_file(tmp_path):
    path = tmp_path / "e.npy"
    np.save(path, E.astype(np.float64))
    got = read_embeddings(str(path))
    assert got.dtype == np.float32 and got.tolist() == E.tolist()


def test_read_2d_npy_file_is_a_batch(tmp_path):
    path = tmp_path / "b.npy"
    np.save(path, np.stack([E, E]))
    assert read_embeddings(str(path)).shape == (2, DIM)


def test_read_json_literal_and_json_file(tmp_path):
    assert read_embeddings("[1, 2.5, -3]").tolist() == [1.0, 2.5, -3.0]
    assert read_embeddings(" [[1, 2], [3, 4]]").shape == (2, 2)
    path = tmp_path / "e.json"
    path.write_text(json.dumps(E.tolist()))
    assert read_embeddings(str(path)).tolist() == E.tolist()


@pytest.mark.parametrize("source", [None, "-"])
def test_read_stdin_json_and_npy(source):
    assert read_embeddings(source, FakeStdin(b"[0.5, 1]\n")).tolist() == [0.5, 1.0]
    assert read_embeddings(source, FakeStdin(npy_bytes(E))).tolist() == E.tolist()


def test_no_input_on_a_terminal_is_an_error():
    with pytest.raises(EmbeddingInputError, match="no EMBEDDING"):
        read_embeddings(None, FakeStdin(b"", tty=True))


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"not json", "neither"),
        (b'["a", "b"]', "expected numbers"),
        (b"[[1, 2], [3]]", "rectangular"),
        (b"[[[1]]]", "shape"),
        (b"3", "shape"),
        (b"\x93NUMPY garbage", ".npy"),
    ],
)
def test_bad_input(data, match):
    with pytest.raises(EmbeddingInputError, match=match):
        parse_embeddings(data)


def test_missing_file():
    with pytest.raises(EmbeddingInputError, match="no such file"):
        read_embeddings("/nonexistent/e.npy")


# --- parsing -------------------------------------------------------------------------------


def test_parse_decode():
    args = cli.build_parser().parse_args(
        ["decode", "e.npy", "--target", "h:1", "--model", "m", "--max-new-tokens", "9", "--json"]
    )
    assert (args.command, args.embedding, args.target, args.model) == (
        "decode",
        "e.npy",
        "h:1",
        "m",
    )
    assert args.max_new_tokens == 9 and args.json and args.timeout is None


def test_parse_generate():
    args = cli.build_parser().parse_args(
        ["generate", "--temperature", "0.5", "--top-k", "4", "--top-p", "0.9", "--seed", "3",
         "--stop", ".", "--stop", "\n", "--stream", "--timeout", "2.5"]
    )  # fmt: skip
    assert args.embedding is None
    assert (args.temperature, args.top_k, args.top_p, args.seed) == (0.5, 4, 0.9, 3)
    assert args.stop == [".", "\n"] and args.stream and args.timeout == 2.5


def test_target_default_from_environment(monkeypatch):
    monkeypatch.delenv("RETD_TARGET", raising=False)
    assert cli.build_parser().parse_args(["health"]).target == DEFAULT_TARGET
    monkeypatch.setenv("RETD_TARGET", "example:9")
    assert cli.build_parser().parse_args(["health"]).target == "example:9"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ["decode", "generate", "info", "models", "health", "serve", "init-checkpoint"]:
        assert command in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: retd" in capsys.readouterr().err


def test_server_commands_are_passed_through(monkeypatch):
    import types

    seen = []
    module = types.ModuleType("retd.server.cli")
    module.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "retd.server.cli", module)
    assert cli.main(["serve", "--help", "--port", "0"]) == 0
    assert cli.main(["bench", "-x"]) == 0
    assert seen == [["serve", "--help", "--port", "0"], ["bench", "-x"]]


# --- against the fake server ---------------------------------------------------------------


def run(argv, capsys, monkeypatch, stdin: bytes = b""):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(FakeStdin(stdin)))
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_decode_command(fake, capsys, monkeypatch, tmp_path):
    target = fake[1]
    assert run(["decode", json.dumps(E.tolist()), "--target", target], capsys, monkeypatch) == (
        0,
        "8 28\n",
        "",
    )
    code, out, _ = run(["decode", "--target", target, "--json"], capsys, monkeypatch, npy_bytes(E))
    assert code == 0
    result = json.loads(out)
    assert result["text"] == "8 28" and result["finish_reason"] == "eos"
    assert result["usage"] == {"generated_tokens": 1}


def test_decode_batch_command(fake, capsys, monkeypatch, tmp_path):
    path = tmp_path / "b.npy"
    np.save(path, np.stack([E, E * 2]))
    code, out, _ = run(["decode", str(path), "--target", fake[1]], capsys, monkeypatch)
    assert (code, out) == (0, "8 28\n8 56\n")
    code, out, _ = run(["decode", str(path), "--target", fake[1], "--json"], capsys, monkeypatch)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["result"]["text"] for line in lines] == ["8 28", "8 56"]
    assert [line["index"] for line in lines] == [0, 1]


def test_ragged_json_batch_is_an_input_error(fake, capsys, monkeypatch):
    batch = json.dumps([[1.0] * DIM, [1.0] * 3])
    code, out, err = run(["decode", "--target", fake[1]], capsys, monkeypatch, batch.encode())
    assert code == 2 and out == "" and "rectangular" in err


def test_batch_output_keeps_one_line_per_item(capsys):
    from retd.client import DecodeBatchItem, DecodeResult, FinishReason, Timing, Usage
    from retd.client.errors import InvalidArgumentError

    ok = DecodeResult("two\nlines", FinishReason.EOS, Usage(1), Timing(0, 0, 0), "m")
    items = [
        DecodeBatchItem(result=ok),
        DecodeBatchItem(error=InvalidArgumentError("embeddings[1]: bad")),
    ]
    assert cli._print_batch(items, sys.stdout, as_json=False) == 2
    captured = capsys.readouterr()
    assert captured.out == "two\\nlines\n\n"
    assert captured.err == "error: item 1: INVALID_ARGUMENT: embeddings[1]: bad\n"
    assert cli._print_batch(items, sys.stdout, as_json=True) == 2
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["result"]["text"] == "two\nlines" and lines[0]["error"] is None
    assert lines[1] == {
        "index": 1,
        "result": None,
        "error": {"code": "INVALID_ARGUMENT", "details": "embeddings[1]: bad"},
    }


def test_rpc_error_output(fake, capsys, monkeypatch):
    code, out, err = run(["decode", "[1, 2]", "--target", fake[1]], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.startswith("error: INVALID_ARGUMENT: embedding: got 2 values")


def test_generate_command(fake, capsys, monkeypatch):
    e = json.dumps(E.tolist())
    code, out, _ = run(
        ["generate", e, "--target", fake[1], "--seed", "5", "--json"], capsys, monkeypatch
    )
    assert code == 0 and json.loads(out)["seed"] == 5
    code, out, _ = run(
        ["generate", e, "--target", fake[1], "--stream", "--max-new-tokens", "3"],
        capsys,
        monkeypatch,
    )
    assert (code, out) == (0, "abc\n")
    code, out, _ = run(
        ["generate", e, "--target", fake[1], "--stream", "--json", "--max-new-tokens", "2"],
        capsys,
        monkeypatch,
    )
    chunks = [json.loads(line) for line in out.splitlines()]
    assert [c["text"] for c in chunks] == ["a", "b", ""] and chunks[-1]["finish_reason"] == "length"


def test_generate_refuses_a_batch(fake, capsys, monkeypatch):
    code, _, err = run(["generate", "[[1], [2]]", "--target", fake[1]], capsys, monkeypatch)
    assert code == 2 and "retd decode" in err


def test_info_models_health(fake, capsys, monkeypatch):
    code, out, _ = run(["info", "--target", fake[1]], capsys, monkeypatch)
    assert code == 0 and "name: fake" in out and "embedding_dim: 8" in out
    code, out, _ = run(["info", "--target", fake[1], "--json"], capsys, monkeypatch)
    assert json.loads(out)["card"]["encoder"]["name"] == "fake-encoder"
    code, out, _ = run(["models", "--target", fake[1]], capsys, monkeypatch)
    assert code == 0 and out.startswith("* fake\t0.0.1")
    code, out, _ = run(["models", "--target", fake[1], "--json"], capsys, monkeypatch)
    assert json.loads(out)["default_model"] == "fake"
    assert run(["health", "--target", fake[1]], capsys, monkeypatch)[:2] == (0, "SERVING\n")
    code, out, _ = run(
        ["health", "--target", fake[1], "--service", "retd.v1.Decoder"], capsys, monkeypatch
    )
    assert (code, out) == (1, "NOT_SERVING\n")
    code, _, err = run(["health", "--target", fake[1], "--service", "x"], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: NOT_FOUND")


def test_unreachable_server_exit_code(capsys, monkeypatch):
    code, _, err = run(["health", "--target", "127.0.0.1:1", "--timeout", "5"], capsys, monkeypatch)
    assert code == 2 and err.startswith("error: UNAVAILABLE")


def test_console_script_runs(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "retd.client.cli", "decode", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "EMBEDDING" in done.stdout
