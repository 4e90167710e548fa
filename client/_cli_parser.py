"""The argument table of the ``retd`` command: its options, subcommands and help
(:func:`build_parser`), and :data:`SERVER_COMMANDS`, the commands the server package runs.
Each client subcommand's function is in ``_cli_commands``."""

from __future__ import annotations

import argparse
import os

from ._cli_commands import (
    _decode,
    _generate,
    _health,
    _info,
    _models,
    _repo_list,
    _repo_load,
    _repo_unload,
)
from ._core import DEFAULT_TARGET

__all__ = ["SERVER_COMMANDS", "build_parser", "package_version"]

#: Subcommands implemented by the server package, with their one-line help: the one table of
#: them (`retd.server.cli` and `retd.model.commands` take their help from it).
SERVER_COMMANDS = {
    "serve": "run the retd server (needs retd[server]; `retd serve --help`)",
    "init-checkpoint": "write a checkpoint for the server (needs retd[server])",
    "bench": "benchmark a server or a model (needs retd[server])",
    "corpus": "build the training corpus from sixteen Debian and PyPI sources (needs retd[train])",
    "tokenizer": "learn a byte-level BPE tokenizer on the training corpus (needs retd[encoder])",
    "embed": "embed the corpus with the sentence encoder (needs retd[encoder])",
    "train": "train a RET decoder on the embedded corpus (needs retd[encoder])",
    "eval": "score a checkpoint on the held-out split (needs retd[encoder])",
    "promote": "make a training run the committed checkpoint if better (needs retd[encoder])",
    "build-phrase-bank": "embed a text file into a phrase bank to serve (needs retd[encoder])",
    "add-editor": "give a phrase bank a RET checkpoint that edits its answers (retd[encoder])",
    "compress-bank": "store a phrase bank's embeddings as 32-byte codes (needs retd[encoder])",
}

_EPILOG = """\
EMBEDDING is a .npy file, a JSON array literal, or - (the default) to read stdin
(.npy bytes or a JSON array). A 2-D array is a batch: one output line per row.

examples:
  retd health
  retd decode emb.npy
  retd decode --text "A small dog barked at the mailman."   # needs `make encoder`
  python -c 'import json; print(json.dumps([0.0] * 768))' | retd decode --json
  retd generate emb.npy --temperature 0.8 --seed 7 --stream
  retd decode emb.npy --no-repeat-ngram 0 --repetition-penalty 1 --eos-bias 0   # plain greedy
  retd info --json
  retd decode emb.npy --model ret --version 1   # one version of a repository model
  retd repo list                                # every model version the server knows
  retd repo load ret --version 1                # load (and pin) version 1 beside the newest
  retd repo unload ret --version 1
  retd serve --help

The server address comes from --target, else $RETD_TARGET, else 127.0.0.1:50051; it may
name several replicas (a,b,c or dns:///name:port): calls are balanced over the healthy ones
(`retd repo` acts on one of them: give it one replica's address). A bearer token comes from
--token, else $RETD_TOKEN; TLS from --tls, --ca-cert, and --cert/--key for mutual TLS.
Exit status: 0 on success, 1 when `retd health` finds the server not serving,
2 on any error (printed as `error: CODE: details`).
"""


def _default_target() -> str:
    return os.environ.get("RETD_TARGET") or DEFAULT_TARGET


def package_version() -> str:
    """The installed retd's version (pyproject.toml's)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("retd")
    except PackageNotFoundError:  # run from a tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the client commands (the server's are listed, not parsed)."""
    parser = argparse.ArgumentParser(
        prog="retd",
        description="retd: decode 768-dim sentence embeddings into text over gRPC.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"retd {package_version()}", help="print it"
    )
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=_default_target(),
        help=f"server address (default: $RETD_TARGET or {DEFAULT_TARGET}); several replicas "
        "as HOST:PORT,HOST:PORT,... or dns:///NAME:PORT are balanced round-robin, with retries "
        "of the calls safe to repeat",
    )
    connection.add_argument(
        "--timeout", type=float, metavar="S", help="deadline of the call in seconds"
    )
    connection.add_argument(
        "--token",
        default=os.environ.get("RETD_TOKEN") or None,
        help="bearer token sent as `authorization: Bearer TOKEN` (default: $RETD_TOKEN, "
        "which other users cannot read from the process list)",
    )
    connection.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    connection.add_argument(
        "--ca-cert",
        metavar="PEM",
        help="trust the CA in this PEM file for the server's certificate (implies --tls)",
    )
    connection.add_argument(
        "--cert", metavar="PEM", help="client certificate for mutual TLS (with --key)"
    )
    connection.add_argument("--key", metavar="PEM", help="client private key for mutual TLS")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", metavar="M", help="model name (default: the server's default)")
    model.add_argument(
        "--version",
        type=int,
        default=0,
        metavar="N",
        help="version N of the model in the server's model repository (default 0: the "
        "newest loaded one)",
    )
    decoding = argparse.ArgumentParser(add_help=False)
    decoding.add_argument(
        "embedding",
        nargs="?",
        metavar="EMBEDDING",
        help="a .npy file, a JSON array, or - for stdin (default)",
    )
    decoding.add_argument(
        "--text",
        action="append",
        metavar="TEXT",
        help="embed TEXT with the sentence encoder and decode that (repeatable; a batch when "
        "repeated; needs the encoder: `make encoder`)",
    )
    decoding.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="tokens to generate at most"
    )
    decoding.add_argument(
        "--no-repeat-ngram",
        type=int,
        metavar="N",
        help="loop breaker: never generate a token that would repeat a token N-gram already in "
        "the text (0: off; at most 256; unset: decode takes the server's default loop "
        "breakers, generate none)",
    )
    decoding.add_argument(
        "--priority",
        type=int,
        metavar="P",
        help="higher is served first when requests wait for a slot; FIFO among equals (0)",
    )
    decoding.add_argument(
        "--json", action="store_true", help="print the full result as JSON (one line per item)"
    )

    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = [connection, model]
    formatter = argparse.RawDescriptionHelpFormatter

    decode = commands.add_parser(
        "decode",
        parents=[*common, decoding],
        formatter_class=formatter,
        help="decode embedding(s) to text, greedily",
        description="Decode one embedding (or a 2-D batch, one line per row) to text, "
        "greedily. Newlines inside a text are printed as \\n in batch mode; "
        "use --json for exact text.",
    )
    decode.add_argument(
        "--repetition-penalty",
        type=float,
        metavar="P",
        help="loop breaker: divide (multiply, when negative) the logit of a token that would "
        "repeat a token n-gram of --repetition-ngram tokens by P (1: off; at most 10; unset: "
        "the server's default)",
    )
    decode.add_argument(
        "--repetition-ngram",
        type=int,
        metavar="N",
        help="the n-gram size --repetition-penalty looks at (1: every token generated; at most "
        "256; unset: the server's default)",
    )
    decode.add_argument(
        "--eos-bias",
        type=float,
        metavar="B",
        help="add B to the end-of-sequence token's logit at every step: below 0 answers run "
        "longer (0: off; in [-20, 20]; unset: the server's default)",
    )
    decode.set_defaults(func=_decode)

    generate = commands.add_parser(
        "generate",
        parents=[*common, decoding],
        formatter_class=formatter,
        help="generate text from one embedding with sampling",
        description="Generate text from one embedding with sampling parameters.",
    )
    generate.add_argument("--temperature", type=float, help="0 is greedy (default: 1.0)")
    generate.add_argument("--top-k", type=int, metavar="K", help="keep the K likeliest tokens")
    generate.add_argument("--top-p", type=float, metavar="P", help="nucleus threshold in (0, 1]")
    generate.add_argument("--seed", type=int, help="seed for reproducible sampling")
    generate.add_argument(
        "--stop", action="append", metavar="TEXT", help="stop at TEXT (repeatable)"
    )
    generate.add_argument("--stream", action="store_true", help="print text as it is generated")
    generate.set_defaults(func=_generate)

    info = commands.add_parser(
        "info",
        parents=common,
        help="describe a model",
        description="Describe a model: one `field: value` line each, then its card as "
        "indented JSON (--json: all of it as one JSON object).",
    )
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)

    models = commands.add_parser(
        "models",
        parents=[connection],
        help="list the server's models",
        description="List the server's models; * marks the default.",
    )
    models.add_argument("--json", action="store_true", help="print JSON")
    models.set_defaults(func=_models)

    health = commands.add_parser(
        "health",
        parents=[connection],
        help="check the server's health (exit 0 when SERVING)",
        description="Query grpc.health.v1; exit 0 when SERVING, 1 otherwise, 2 on error.",
    )
    health.add_argument(
        "--service", default="", help='service name (default: "", the whole server)'
    )
    health.set_defaults(func=_health)

    repo = commands.add_parser(
        "repo",
        help="list, load and unload model versions (the admin service)",
        description="The server's model repository (`retd serve --model-repo DIR`): list "
        "its model versions, load or unload one. A server with --auth-tokens or "
        "--admin-tokens needs --token (an admin one); a server on a non-loopback address "
        "without tokens refuses these calls.",
    )
    actions = repo.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        parents=[connection],
        help="every model version: ready, loading, unloading, failed, or on disk",
        description="List every model version the server knows; * marks the version that "
        "calls naming none get.",
    )
    listing.add_argument("model", nargs="?", default="", metavar="MODEL", help="only MODEL's")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_repo_list)
    for action, text, what in (
        ("load", "load a model version and wait until it serves", "load (0: the newest)"),
        ("unload", "unload a model version once its calls finish", "unload (0: every one)"),
    ):
        sub = actions.add_parser(action, parents=[connection], help=text, description=text + ".")
        sub.add_argument("model", metavar="MODEL", help="model name")
        sub.add_argument(
            "--version", type=int, default=0, metavar="N", help=f"the version to {what}"
        )
        sub.add_argument("--json", action="store_true", help="print JSON")
        sub.set_defaults(func=_repo_load if action == "load" else _repo_unload)

    for name, text in SERVER_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser
