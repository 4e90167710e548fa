"""The `retd` command line: parsing and embedding input. Every client command end to end
against the real daemon: test_cli_commands.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from retd.client import DEFAULT_TARGET, cli
from retd.client.inputs import EmbeddingInputError, parse_embeddings, read_embeddings
from tests.client.conftest import DIM, FakeStdin, npy_bytes

E = np.arange(DIM, dtype=np.float32)


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
         "--stop", ".", "--stop", "\n", "--stream", "--timeout", "2.5", "--priority", "-4"]
    )  # fmt: skip
    assert args.embedding is None
    assert (args.temperature, args.top_k, args.top_p, args.seed) == (0.5, 4, 0.9, 3)
    assert args.stop == [".", "\n"] and args.stream and args.timeout == 2.5
    assert args.priority == -4
    assert cli.build_parser().parse_args(["decode"]).priority is None


def test_version_flag(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"retd {version('retd')}\n"
    done = subprocess.run(
        [shutil.which("retd", path=os.path.dirname(sys.executable)), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.startswith("retd 0.")
    # A subcommand's --version is still the model version it asks for.
    assert cli.build_parser().parse_args(["decode", "--version", "2"]).version == 2


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
    for command in [
        *["decode", "generate", "info", "models", "health", "serve", "init-checkpoint"],
        *["corpus", "embed", "train", "eval"],
    ]:
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
